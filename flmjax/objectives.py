"""Training objectives as small named units, and the FLM denoising objective.

An `Objective` says what it trains (the run kind of its checkpoints, which picks the model
options and the sampler in flmjax/registry.py) and what it needs: a frozen teacher, boundary
rows of the batch (tau_s = 0, tau_t = 1), forward-mode differentiation of the model (jvp).
`build(config, vocab_size, teacher_graphdef, train)` returns the loss function
(model, batch, rng, frozen) -> (loss, metrics) that the training loop differentiates;
`train=False` gives the same loss without dropout, for validation on fixed draws.
"""

import dataclasses
from typing import Callable

import ml_collections

from flmjax import flow
from flmjax.schedule import get_schedule
from flmjax.state import ObjectiveFn


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  kind: str  # the family it trains: "flm", "fmlm" or a baseline (flmjax/registry.py)
  build: Callable[..., ObjectiveFn]
  teacher: bool = False  # reads a frozen teacher's params (passed as `frozen`)
  boundary_rows: bool = False  # takes rows with tau_s = 0, tau_t = 1
  jvp: bool = False  # differentiates the model forward (jax.jvp)


def denoising(config: ml_collections.ConfigDict, vocab_size: int, teacher_graphdef=None, *,
              train: bool = True) -> ObjectiveFn:
  """The FLM cross entropy (flow.flm_loss) of the model; dropout only when training."""
  del teacher_graphdef
  schedule = get_schedule(vocab_size)

  def objective(model, batch, rng, frozen):
    del frozen

    def denoiser(h, tau, key):
      return model(h, tau, dropout_rng=key if train else None, capped=False)

    return flow.flm_loss(denoiser, model.vocab_embed[...], batch["tokens"], rng, schedule,
                         latent=config.noise == "latent", cap=model.output_cap,
                         loss_weight=model.loss_weight if model.loss_weight_mlp else None)
  return objective


FLM = Objective("flm", "flm", denoising)
