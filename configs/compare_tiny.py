"""--mode=compare at the size of configs/tiny.py: FLM -> FMLM, MDLM, SEDD, Duo -> Duo + DCD
and AR on the embedded corpus with the same backbone (D 256, 4 blocks), tokenizer (V 4096),
L 64, batch 32 and 900 training steps each (200 distillation steps for each student),
evaluated at 1, 2, 4, 8, 16 and 64 steps."""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.eval.compare_steps = "1,2,4,8,16,64"
  return config
