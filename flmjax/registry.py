"""The model families and training objectives that flmjax knows, by name.

A family is the kind of model a run trains (saved as the run kind in its checkpoints): the
model options it sets and the sampler its checkpoints are sampled with. An objective
(flmjax/objectives.py) names the family it trains. A new family is one module that
defines its objective(s) and sampler rule, plus an entry in each table below.
"""

import copy
import dataclasses

import ml_collections

from flmjax import distill, objectives, sampling
from flmjax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Family:
  kind: str
  model: dict  # the `model` config fields this family sets
  sampler: sampling.Rule


FAMILIES = {family.kind: family for family in (
    Family("flm", {"two_time": False}, sampling.EULER),
    Family("fmlm", {"two_time": True}, sampling.FLOW_MAP),
)}

# The objective of --mode=train is "flm"; --mode=distill takes distill.objective.
OBJECTIVES = {objective.name: objective for objective in (
    objectives.FLM, distill.SEMIGROUP, distill.EULERIAN, distill.LAGRANGIAN)}
DISTILLATION = tuple(name for name, o in OBJECTIVES.items() if o.teacher)


def family(kind: str, where: str) -> Family:
  """The family of a run kind read from `where` (a checkpoint's record)."""
  if kind not in FAMILIES:
    raise UsageError(f"{where} holds a {kind!r} model, which this flmjax does not know "
                     f"(it knows {', '.join(FAMILIES)}).")
  return FAMILIES[kind]


def with_family(config: ml_collections.ConfigDict,
                objective: objectives.Objective) -> ml_collections.ConfigDict:
  """A copy of `config` whose `model` has the options of the family that `objective`
  trains (what its checkpoints record). An objective that differentiates the model
  forward (jvp) gets the plain attention path for attention=auto: it has a JVP rule on
  every backend, where a fused kernel with only a custom backward pass would not."""
  config = copy.deepcopy(config)
  config.model.update(FAMILIES[objective.kind].model)
  if objective.jvp and config.model.attention == "auto":
    config.model.attention = "plain"
  return config
