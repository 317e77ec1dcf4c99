"""A CPU-sized run on the embedded Wikipedia corpus: minutes on two cores."""

from configs import base


def get_config():
  config = base.get_config()
  config.batch_size = 32
  config.tokenizer.vocab_size = 4096
  config.model.width = 256
  config.model.depth = 4
  config.model.heads = 4
  config.train.steps = 600
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.ema_decay = 0.99
  config.train.log_every = 25
  config.train.eval_every = 200
  config.train.eval_batches = 4
  config.train.sample_every = 200
  config.train.checkpoint_every = 100
  config.train.keep_period = 0
  return config
