"""A CPU-sized run on the embedded Wikipedia corpus: the whole pipeline in about 10
minutes on two cores (D 256, 4 blocks, L 64, batch 32, V 4096)."""

from configs import base


def get_config():
  config = base.get_config()
  config.batch_size = 32
  config.data.seq_len = 64
  config.tokenizer.vocab_size = 4096
  config.model.width = 256
  config.model.depth = 4
  config.model.heads = 4
  config.train.steps = 900
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.ema_decay = 0.99
  config.train.log_every = 50
  config.train.eval_every = 300
  config.train.eval_batches = 8
  config.train.sample_every = 300
  config.train.checkpoint_every = 100
  config.train.keep_period = 0
  config.distill.steps = 200
  config.distill.learning_rate = 1e-3
  # The paper's 1/64 of the batch gives no boundary (one-step) row at batch 32.
  config.distill.boundary_fraction = 0.125
  # DCD (a Duo student): five rounds of 40 steps, dt from 1/128 to 1/8, a fifth of the
  # teacher's learning rate (as in Duo's recipe).
  config.distill.dcd.update(round_steps=40, grid=128, learning_rate=2e-4)
  config.eval.num_samples = 32
  return config
