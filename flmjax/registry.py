"""The model families and training objectives that flmjax knows, by name.

A family is the kind of model a run trains (saved as the run kind in its checkpoints): the
model options it sets, its samplers (the first is its default) and the objective that
trains it from data (`config.family` for --mode=train; the FMLM student is distilled).
An objective (flmjax/objectives.py) names the family it trains. A new family is one
module that defines its objective and sampler factories, plus an entry in each table.

| family | model | samplers | validation loss |
|---|---|---|---|
| flm | the FLM denoiser | euler | FLM cross entropy |
| fmlm | two-time flow map | flowmap | FLM cross entropy at s = t |
| mdlm | ids in, no output cap | ancestral_cache, ancestral | NLL bound (nats/token) |
| sedd | ids in, no output cap | analytic | NLL bound (nats/token) |
| d3pm | ids in, no output cap | ancestral | NLL bound (nats/token) |
| duo | ids in, no output cap | ancestral, greedy | NLL bound (nats/token) |
| ar | causal, no adaLN | ar | exact NLL (nats/token) |
"""

import copy
import dataclasses
from typing import Callable

import ml_collections

from flmjax import absorbing, autoregressive, distill, objectives, sampling, uniform
from flmjax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Family:
  kind: str
  model: dict  # the `model` config fields this family sets
  samplers: dict[str, Callable]  # name -> factory (steps, num_samples, seq_len, Options)
  likelihood: bool = False  # its validation loss bounds the NLL: report exp() as PPL
  discrete: bool = False  # token ids in and out: temperature, top-p
  masked: bool = False  # reads model.mask_id (the tokenizer's mask id)

  @property
  def default_sampler(self) -> str:
    return next(iter(self.samplers))


BASELINE = {"two_time": False, "output_cap": 0.0, "causal": False}
FAMILIES = {family.kind: family for family in (
    Family("flm", {"two_time": False, "causal": False},
           {"euler": sampling.sampler(sampling.EULER)}),
    Family("fmlm", {"two_time": True, "causal": False},
           {"flowmap": sampling.sampler(sampling.FLOW_MAP)}),
    Family("mdlm", BASELINE, {"ancestral_cache": absorbing.sampler("mdlm", cache=True),
                              "ancestral": absorbing.sampler("mdlm")},
           likelihood=True, discrete=True, masked=True),
    Family("sedd", BASELINE, {"analytic": absorbing.sampler("sedd")}, likelihood=True,
           discrete=True, masked=True),
    Family("d3pm", BASELINE, {"ancestral": absorbing.sampler("d3pm")}, likelihood=True,
           discrete=True, masked=True),
    Family("duo", BASELINE, {"ancestral": uniform.sampler(),
                             "greedy": uniform.sampler(greedy=True)},
           likelihood=True, discrete=True),
    Family("ar", dict(BASELINE, causal=True, attn_softcap=0.0),
           {"ar": autoregressive.sampler}, likelihood=True, discrete=True, masked=True),
)}
SAMPLERS = tuple(dict.fromkeys(name for f in FAMILIES.values() for name in f.samplers))

# --mode=train trains the objective named config.family; --mode=distill distill.objective.
OBJECTIVES = {objective.name: objective for objective in (
    objectives.FLM, distill.SEMIGROUP, distill.EULERIAN, distill.LAGRANGIAN,
    objectives.Objective("mdlm", "mdlm", absorbing.mdlm_objective),
    objectives.Objective("sedd", "sedd", absorbing.sedd_objective),
    objectives.Objective("d3pm", "d3pm", absorbing.d3pm_objective, passes=2),
    objectives.Objective("duo", "duo", uniform.objective),
    objectives.Objective("dcd", "duo", uniform.dcd_objective, teacher="duo",
                         self_teacher=True),
    objectives.Objective("ar", "ar", autoregressive.objective))}
DISTILLATION = tuple(name for name, o in OBJECTIVES.items() if o.teacher)
TRAINABLE = tuple(name for name, o in OBJECTIVES.items() if not o.teacher)


def family(kind: str, where: str) -> Family:
  """The family of a run kind read from `where` (a checkpoint's record)."""
  if kind not in FAMILIES:
    raise UsageError(f"{where} holds a {kind!r} model, which this flmjax does not know "
                     f"(it knows {', '.join(FAMILIES)}).")
  return FAMILIES[kind]


def with_family(config: ml_collections.ConfigDict, objective: objectives.Objective,
                tokenizer=None) -> ml_collections.ConfigDict:
  """A copy of `config` whose `model` has the options of the family that `objective`
  trains (what its checkpoints record), and the mask id of `tokenizer` where the family
  needs one. An objective that differentiates the model forward (jvp) gets the plain
  attention path for attention=auto: it has a JVP rule on every backend, where a fused
  kernel with only a custom backward pass would not. The causal AR model of L - 1 tokens
  gets auto for the splash and flash kernels, which cannot run it (--mode=compare, whose
  attention is chosen for the FLM; validation refuses them for family=ar)."""
  config = copy.deepcopy(config)
  config.model.update(FAMILIES[objective.kind].model)
  if objective.jvp and config.model.attention == "auto":
    config.model.attention = "plain"
  if config.model.causal and config.model.attention in ("splash", "flash"):
    config.model.attention = "auto"
  if FAMILIES[objective.kind].masked and tokenizer is not None:
    if tokenizer.mask_id is None:
      raise UsageError(f"family={objective.kind} needs a mask id, and this {tokenizer.kind} "
                       f"tokenizer ({tokenizer.source}) has none: use a vocabulary with a "
                       "[MASK] token, or tokenizer.kind=sentencepiece or gpt2.")
    config.model.mask_id = tokenizer.mask_id
  return config


def check_sample_options(kind: str, sample: ml_collections.ConfigDict, where: str,
                         churn: bool = True) -> None:
  """Refuses config.sample options that the weights in `where` (of family `kind`) do not
  take (the churn only with `churn`: evaluation leaves it to the flow-map rows, as the
  distillation configs set it for their students); runs over several families (pipeline,
  compare) leave them out where they do not apply, but for a named sampler, which
  validation refuses unless every family they train has it."""
  found = family(kind, where)
  if sample.sampler != "auto" and sample.sampler not in found.samplers:
    raise UsageError(f"sample.sampler={sample.sampler}: {where} holds a {kind} model, whose "
                     f"samplers are {', '.join(found.samplers)} (or auto).")
  if churn and sample.gamma and "flowmap" not in found.samplers:
    raise UsageError(f"sample.gamma={sample.gamma} is the churn of the flow-map sampler, "
                     f"but {where} holds a {kind} model; set sample.gamma=0 or point "
                     "config.checkpoint at a distilled student.")
  if not found.discrete and (sample.temperature != 1 or sample.top_p != 1):
    raise UsageError(f"sample.temperature={sample.temperature} and sample.top_p="
                     f"{sample.top_p} apply to the discrete baselines; the {kind} sampler "
                     "follows the flow deterministically: set both to 1.")


def sampler(kind: str, config: ml_collections.ConfigDict, steps: int, num_samples: int, *,
            seq_len: int, mask_id: int, bos_id: int) -> tuple[str, Callable]:
  """(name, function (graphdef, params, rng) -> (tokens, network calls)) of a `kind`
  model with config.sample's sampler (auto: the family's default; one it does not have
  is a UsageError) and the options that apply to it."""
  found = FAMILIES[kind]
  name = config.sample.sampler if config.sample.sampler in found.samplers \
      else found.default_sampler
  if config.sample.sampler not in ("auto", name):
    check_sample_options(kind, config.sample, f"this {kind} run")
  options = sampling.Options(
      gamma=config.sample.gamma if name == "flowmap" else 0.0,
      latent=config.noise == "latent",
      temperature=config.sample.temperature if found.discrete else 1.0,
      top_p=config.sample.top_p if found.discrete else 1.0, mask_id=mask_id, bos_id=bos_id,
      guidance=0.0 if found.discrete else config.sample.guidance)
  label = name if kind == "ar" else f"{name}_{steps}"
  return label, found.samplers[name](steps, num_samples, seq_len, options)
