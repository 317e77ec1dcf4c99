"""Duo on OpenWebText, the recipe of Duo's OWT script (scripts/train_owt_duo.sh in the
reference; docs/baselines.md, "Duo's Gaussian curriculum"): configs/owt.py with
family=duo, Duo's Gaussian curriculum (tau = 1e-3, g in [-3.55, -1.85]) for the first
500k of 1M steps, then the bound on discrete states.

  python -m flmjax.main --config=configs/owt_duo.py --workdir=DIR --mode=train
"""

from configs import owt


def get_config():
  config = owt.get_config()
  config.family = "duo"
  config.duo.curriculum_end = 500_000  # the other duo fields default to this script's
  return config
