"""A CPU-sized run on the embedded Wikipedia corpus: minutes on two cores."""

from configs import base


def get_config():
  config = base.get_config()
  config.batch_size = 32
  config.tokenizer.vocab_size = 4096
  config.model.width = 256
  config.model.depth = 4
  config.model.heads = 4
  return config
