"""The paper's LM1B FMLM student: configs/lm1b.py's data and model, distilled with AdamW
3e-4, beta2 0.95, batch 512, 100k steps; evaluated with churn 0.8.

  python -m flmjax.main --config=configs/lm1b_distill.py --workdir=DIR --mode=distill \\
      --config.teacher_checkpoint=TEACHER_WORKDIR --config.tokenizer.path=vocab.txt
"""

from configs import lm1b


def get_config():
  config = lm1b.get_config()
  config.distill.batch_size = 512
  config.sample.gamma = 0.8
  config.eval.steps = "1,2,4,8,16,32"
  return config
