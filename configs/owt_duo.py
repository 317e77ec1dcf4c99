"""Duo on OpenWebText, the recipe of Duo's OWT script (BASELINES.md sections 1.6 and 6.3):
configs/owt.py with family=duo, Duo's Gaussian curriculum (tau = 1e-3, g in [-3.55,
-1.85]) for the first 500k of 1M steps, then the bound on discrete states.

  python -m flmjax.main --config=configs/owt_duo.py --workdir=DIR --mode=train
"""

from configs import owt


def get_config():
  config = owt.get_config()
  config.family = "duo"
  config.duo.update(curriculum_end=500_000, gamma_min=-3.55, gamma_max=-1.85,
                    curriculum_start=0, tau_log10_start=-3.0, tau_log10_end=-3.0)
  return config
