"""Training objectives as small named units, and the FLM denoising objective.

An `Objective` says what it trains (the run kind of its checkpoints, which picks the model
options and the sampler in flmjax/registry.py) and what it needs: a teacher (the family
of config.teacher_checkpoint), boundary rows of the batch (tau_s = 0, tau_t = 1),
forward-mode differentiation of the model (jvp).
`build(config, vocab_size, teacher_graphdef, train)` returns the loss function
(model, batch, rng, frozen, part=(0, 1)) -> (loss, metrics) that the training loop
differentiates, `part` (index, parts) being which microbatch of train.grad_accum the batch
is (its times are its share of a draw stratified over the global batch:
flow.stratified_uniform); `train=False` gives the same loss without dropout, for
validation on fixed draws.
"""

import dataclasses
from typing import Callable

import jax
import ml_collections

from flmjax import conditioning, flow, sharding
from flmjax.schedule import get_schedule
from flmjax.state import ObjectiveFn


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  kind: str  # the family it trains: "flm", "fmlm" or a baseline (flmjax/registry.py)
  build: Callable[..., ObjectiveFn]
  # The family of the teacher it distils ("" for none); the teacher's params are passed
  # as `frozen`.
  teacher: str = ""
  # The teacher is the student itself, copied at the start of every round of
  # distill.dcd.round_steps steps (state.py); teacher_checkpoint is where the student starts.
  self_teacher: bool = False
  boundary_rows: bool = False  # takes rows with tau_s = 0, tau_t = 1
  jvp: bool = False  # differentiates the model forward (jax.jvp)
  passes: int = 1  # network passes per example (D3PM's also reads the clean sequence)


# The fused output head's chunk when model.output_chunk is 0: the most tokens whose
# float32 logits fit in this many bytes on the platform traced for (default: all but
# GPUs). On a GPU, larger chunks save passes over the output layer per chunk
# (docs/performance.md); on a CPU, smaller ones keep the logits nearer the cores.
HEAD_CHUNK_BYTES = {"gpu": 512 * 2**20, "default": 128 * 2**20}


def head_chunk(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> int:
  """Tokens per chunk of the fused output head (flow.head_cross_entropy)."""
  budget = HEAD_CHUNK_BYTES.get(sharding.target_platform(), HEAD_CHUNK_BYTES["default"])
  return model_cfg.output_chunk or max(1, budget // (4 * vocab_size))


def denoising(config: ml_collections.ConfigDict, vocab_size: int, teacher_graphdef=None, *,
              train: bool = True) -> ObjectiveFn:
  """The FLM cross entropy (flow.flm_loss) of the model; dropout only when training.

  model.output_head "fused" or "auto" applies the output layer inside the loss, in chunks
  (flow.head_cross_entropy); "plain" takes the model's [B, L, V] logits. With
  train.condition, each example gets given positions (conditioning.draw).
  """
  del teacher_graphdef
  schedule = get_schedule(vocab_size)
  fused = config.model.output_head in ("auto", "fused")
  chunk = head_chunk(config.model, vocab_size)
  kinds = conditioning.parse_kinds(config.train.condition)

  def objective(model, batch, rng, frozen, part=(0, 1)):
    del frozen
    dropout = (lambda key: key) if train else (lambda key: None)
    given = None
    if kinds:
      rng, rng_given = jax.random.split(rng)
      given = conditioning.draw(rng_given, batch["tokens"].shape, kinds,
                                config.train.condition_dropout)
    if fused:
      def denoiser(h, tau, key):
        return model.features(h, tau, given=given, dropout_rng=dropout(key))

      def head(features, tokens, weights):
        return flow.head_cross_entropy(
            features, model.output.kernel[...], model.output.bias[...], tokens, weights,
            model.output_cap, model.output.dtype, chunk)
    else:
      def denoiser(h, tau, key):
        return model(h, tau, given=given, dropout_rng=dropout(key), capped=False)
      head = None

    return flow.flm_loss(denoiser, model.vocab_embed[...], batch["tokens"], rng, schedule,
                         given=given, latent=config.noise == "latent",
                         cap=model.output_cap, head=head,
                         loss_weight=model.loss_weighting, part=part)
  return objective


FLM = Objective("flm", "flm", denoising)
