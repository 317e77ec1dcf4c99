"""The paper's OpenWebText FMLM student: configs/owt.py's data and model, distilled with
AdamW 3e-4, beta2 0.95, batch 128, 100k steps; evaluated with churn 1.0.

  python -m flmjax.main --config=configs/owt_distill.py --workdir=DIR --mode=distill \\
      --config.teacher_checkpoint=TEACHER_WORKDIR
"""

from configs import owt


def get_config():
  config = owt.get_config()
  config.distill.batch_size = 128
  config.sample.gamma = 1.0
  config.eval.steps = "1,2,4,8,16,32"
  return config
