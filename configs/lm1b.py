"""The paper's LM1B teacher: DiT small, BERT WordPiece (V = 30522), L = 128, batch 512.

Needs Hugging Face datasets with internet access, and bert-base-uncased's vocab.txt:
  --config.tokenizer.path=/path/to/vocab.txt
"""

from configs import base


def get_config():
  config = base.get_config()
  # The noise draw: "latent" (the default) is faster and leaner; "vocab" draws the
  # V-dimensional noise as the reference does and reproduces its training dynamics
  # (docs/training.md, "Noise").
  config.noise = "latent"
  config.data.corpus = "lm1b"
  config.data.seq_len = 128
  config.tokenizer.kind = "bert"
  return config
