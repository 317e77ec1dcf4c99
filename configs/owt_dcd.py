"""Duo's discrete consistency distillation (DCD) on OpenWebText, the recipe of Duo's OWT
distillation script (scripts/distil_owt.sh in the reference; docs/baselines.md, "Duo's
consistency distillation (DCD)"): a Duo student of a Duo run of configs/owt.py
(--config.family=duo), AdamW 6e-5 (0.9, 0.999), 500 warmup steps, batch 128, EMA 0.999,
50k steps in five rounds of 10k (dt = 1/512 ... 1/32), g in [-4, -1], KL(student ||
teacher); validation every 1000 steps on 8 batches.

  python -m flmjax.main --config=configs/owt_dcd.py --workdir=DIR --mode=distill \\
      --config.teacher_checkpoint=DUO_WORKDIR
"""

from configs import owt


def get_config():
  config = owt.get_config()
  config.family = "duo"
  config.distill.update(objective="dcd", steps=50_000, batch_size=128)
  config.distill.dcd.update(grid=512, round_steps=10_000, gamma_min=-4.0, gamma_max=-1.0,
                            divergence="kl-bwd", learning_rate=6e-5, b2=0.999)
  config.train.update(warmup_steps=500, ema_decay=0.999, eval_every=1000, eval_batches=8)
  config.eval.steps = "1,2,4,8,16,32"
  return config
