"""Duo on LM1B, the recipe of Duo's LM1B script (scripts/train_lm1b_duo.sh in the
reference; docs/baselines.md, "Duo's Gaussian curriculum"): configs/lm1b.py with
family=duo, Duo's Gaussian curriculum (tau = 1e-3, g in [-3.5, -1.75]) for the first 500k
of 1M steps, then the bound on discrete states. The data are
configs/lm1b.py's, packed into full 128-token sequences like the script's
`sentencepacking` variant; the script itself pads single sentences to 128.

  python -m flmjax.main --config=configs/lm1b_duo.py --workdir=DIR --mode=train \\
      --config.tokenizer.path=/path/to/vocab.txt
"""

from configs import lm1b


def get_config():
  config = lm1b.get_config()
  config.family = "duo"
  config.duo.update(curriculum_end=500_000, gamma_min=-3.5, gamma_max=-1.75)
  return config
