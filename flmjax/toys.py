"""Toy sources whose samples have an exact judge, and the table of how valid each family's
samples are at each step count: `python -m flmjax.toys --seed=1` (run from the repository
root: it reads configs/base.py). `--prompted` gives instead the rates at which an FLM and
its FMLM student, trained with or without given positions (flmjax/conditioning.py),
continue a given prefix of a markov walk, or lead into a given suffix, with an allowed
transition; `--guidance` those rates in one step against classifier-free guidance.

Every example is BOS followed by L - 1 tokens of a source over K tokens; ids K (BOS) and
K + 1 (the mask id) complete the vocabulary, V = K + 2.
- `phrases`: each example is one of 4 fixed phrases of 7 random tokens (K = 16). A
  sample's score is 1 when it is BOS and one of them, else 0. A sampler that draws
  positions independently mixes phrases ("New Diego"): from all-mask, one MDLM or SEDD
  step does, and from uniform ids one Duo step.
- `markov`: a walk on a ring of K = 16 tokens, each followed by the next one or the third
  next one with probability 1/2 (L = 16). A sample's score is its share of allowed
  transitions (after BOS): 1 for the chain, 2/16 for uniform tokens.

Each family trains from the same random start on the same batches with its own objective
(flmjax/registry.py), Adam at 3e-3: FLM, then its FMLM student by the semigroup objective,
MDLM, D3PM, SEDD, Duo, then Duo's DCD student (`dcd`: Adam at 6e-4, a fifth, as in Duo's
recipe; six rounds of a sixth of the steps, T = 256, so dt ends at 1/8; g in [-4, 4],
where alpha falls from 1 to 0.016 at V = 18), and AR; then samples through the families'
own samplers. `duo-curriculum` (not in the default table) is Duo trained with its Gaussian
curriculum for the first half of the steps, over the same g range (Duo's own, [-3.55,
-1.85], keeps alpha above 0.72 at V = 18: inputs mostly clean), tau = 1e-3.
"""

import argparse
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flmjax import registry, sampling
from flmjax.models import dit

K = 16  # source tokens
BOS, MASK, V = K, K + 1, K + 2
PHRASES = np.random.default_rng(0).integers(0, K, (4, 7))


def phrases(key, batch: int) -> jax.Array:
  chosen = jax.random.randint(key, (batch,), 0, len(PHRASES))
  return jnp.concatenate([jnp.full((batch, 1), BOS), jnp.asarray(PHRASES)[chosen]], axis=1)


def markov(key, batch: int, length: int = 16) -> jax.Array:
  start_key, jump_key = jax.random.split(key)
  start = jax.random.randint(start_key, (batch, 1), 0, K)
  jumps = jnp.where(jax.random.bernoulli(jump_key, 0.5, (batch, length - 2)), 1, 3)
  walk = (start + jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                                   jnp.cumsum(jumps, axis=1)], axis=1)) % K
  return jnp.concatenate([jnp.full((batch, 1), BOS), walk], axis=1)


def score(source: str, tokens) -> np.ndarray:
  """The exact judge's score of each sample [N, L] in [0, 1] (see above)."""
  if source not in SOURCES:
    raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
  tokens = np.asarray(tokens)
  if source == "phrases":
    return ((tokens[:, 0] == BOS) &
            (tokens[:, None, 1:] == PHRASES[None]).all(-1).any(-1)).astype(float)
  walk = tokens[:, 1:]
  allowed = np.isin(np.diff(walk, axis=1) % K, (1, 3)) & (walk[:, 1:] < K) & (walk[:, :-1] < K)
  return allowed.mean(-1)


SOURCES = {"phrases": phrases, "markov": markov}
SEQ_LEN = {"phrases": 8, "markov": 16}


def _config(family: str) -> ml_collections.ConfigDict:
  from configs import base  # pylint: disable=import-outside-toplevel
  config = base.get_config()
  config.model.update(width=64, depth=2, heads=4, cond_width=32, dropout=0.0,
                      dtype="float32", mask_id=MASK)
  config.family = family
  config.distill.boundary_fraction = 0.25
  config.distill.dcd.update(grid=256, gamma_min=-4.0, gamma_max=4.0)
  return config


CURRICULUM = "duo-curriculum"  # Duo with its Gaussian curriculum for the first half


def _objective(family: str):
  return registry.OBJECTIVES[{"fmlm": "semigroup", CURRICULUM: "duo"}.get(family, family)]


def fit(family: str, source: str, steps: int, seed: int, batch: int = 64, teacher=None,
        condition: str = ""):
  """(graphdef, params) of `family` trained for `steps` on the source (FMLM and DCD:
  distilled from `teacher`, the FLM's or Duo's (graphdef, params), which they also start
  from; DCD's teacher is then the student at the start of each round); FLM with
  `condition` (train.condition) trains conditionally, with the condition embedding."""
  objective = _objective(family)
  config = registry.with_family(_config(family), objective)
  config.train.condition = condition
  config.model.condition_embedding = bool(condition)
  config.distill.dcd.round_steps = max(1, -(-steps // 6))
  if family == CURRICULUM:
    config.duo.update(curriculum_end=steps // 2, gamma_min=-4.0, gamma_max=4.0)
  graphdef, params = nnx.split(dit.builder(config.model, V, seed)())
  params = nnx.to_pure_dict(params)
  # train=False: no dropout nor the distillation's target dropout; the curriculum is a
  # phase of the training objective only (model.dropout is 0 here)
  loss_fn = objective.build(config, V, teacher[0] if teacher else None,
                            train=family == CURRICULUM)
  frozen = teacher[1] if teacher else None
  if teacher:
    params = dict(params, **teacher[1])
  tx = optax.adam(3e-3 / 5 if objective.self_teacher else 3e-3)
  draw = functools.partial(SOURCES[source], batch=batch)

  @jax.jit
  def step(params, opt_state, i, frozen):
    key = jax.random.fold_in(jax.random.key(seed), i)
    batch = {"tokens": draw(jax.random.fold_in(key, 1))}
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch, key, frozen)[0])(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for i in range(steps):
    if objective.self_teacher:
      if i % config.distill.dcd.round_steps == 0:
        frozen = {"params": params, "step": np.int32(i)}
      frozen = dict(frozen, step=np.int32(i))
    elif family == CURRICULUM:
      frozen = {"step": np.int32(i)}
    params, opt_state = step(params, opt_state, np.int32(i), frozen)
  return graphdef, params


def samples(family: str, model, source: str, steps: int, n: int, seed: int, condition=None,
            guidance: float = 0.0):
  """(tokens [n, L], network calls) of the family's default sampler (FLM and FMLM: given
  `condition`, a sampling.Condition, with classifier-free `guidance`)."""
  found = registry.FAMILIES[_objective(family).kind]
  make = found.samplers[found.default_sampler]
  sample = make(steps, n, SEQ_LEN[source],
                sampling.Options(mask_id=MASK, bos_id=BOS, guidance=guidance))
  tokens, calls = sample(*model, jax.random.key(seed),
                         **({} if condition is None else {"condition": condition}))
  return np.asarray(tokens), int(calls)


def prompted_rate(family: str, model, kind: str, steps: int, n: int, seed: int,
                  guidance: float = 0.0) -> float:
  """The share of `n` markov walks, given a prefix (or a suffix) of k ~ U{2, ..., L - 2}
  of their tokens, whose first written token fits: an allowed successor of the prefix's
  last token (an allowed predecessor of the suffix's first)."""
  length = SEQ_LEN["markov"]
  key_walk, key_count = jax.random.split(jax.random.key(seed))
  walks = np.asarray(markov(key_walk, n))
  count = np.asarray(jax.random.randint(key_count, (n, 1), 2, length - 1))
  given = np.arange(length) < count if kind == "prefix" else np.arange(length) >= length - count
  tokens, _ = samples(family, model, "markov", steps, n, seed + 1,
                      sampling.Condition(jnp.asarray(given), jnp.asarray(walks)), guidance)
  rows, edge = np.arange(n), count[:, 0] if kind == "prefix" else length - count[:, 0] - 1
  written, known = tokens[rows, edge], walks[rows, edge - 1 if kind == "prefix" else edge + 1]
  step = (written - known) % K if kind == "prefix" else (known - written) % K
  return float((np.isin(step, (1, 3)) & (written < K)).mean())


STEPS = {"flm": (1, 8, 64), "fmlm": (1, 2, 4), "mdlm": (1, 2, 4, 8, 64),
         "d3pm": (1, 2, 4, 8, 64), "sedd": (1, 2, 4, 8, 64), "duo": (1, 2, 4, 8, 64),
         "dcd": (1, 2, 4, 8), "ar": (None,)}
TEACHERS = {"fmlm": "flm", "dcd": "duo"}  # a student's family after its teacher's


def table(source: str, seed: int, train_steps: int = 600, n: int = 256,
          steps: dict = STEPS) -> list[dict]:
  """Rows {family, steps, calls, score}: the mean score of each family's samples at each
  of its `steps` (FMLM and DCD need FLM and Duo, their teachers, before them)."""
  models, rows = {}, []
  for family, counts in steps.items():
    if family in TEACHERS and TEACHERS[family] not in models:
      raise ValueError(f"{family} is distilled from {TEACHERS[family]}: put "
                       f"{TEACHERS[family]} before it in `steps`")
    teacher = models.get(TEACHERS.get(family))
    models[family] = fit(family, source, train_steps, seed, teacher=teacher)
    for steps in counts:
      tokens, calls = samples(family, models[family], source, steps or 1, n, seed + 100)
      rows.append({"family": family, "steps": steps, "calls": calls,
                   "score": float(score(source, tokens).mean())})
  return rows


def prompted_table(seed: int, train_steps: int = 600, n: int = 512,
                   steps: dict = (("flm", (1, 8, 64)), ("fmlm", (1, 2, 4)))) -> list[dict]:
  """Rows {family, training, kind, steps, rate}: prompted_rate on markov of an FLM
  trained with train.condition=prefix,suffix and its FMLM student distilled with the
  same, and of the two trained without (conditioned by clamping only)."""
  rows = []
  for training, condition in (("conditional", "prefix,suffix"), ("clamped", "")):
    models = {"flm": fit("flm", "markov", train_steps, seed, condition=condition)}
    models["fmlm"] = fit("fmlm", "markov", train_steps, seed, teacher=models["flm"],
                         condition=condition)
    for family, counts in dict(steps).items():
      for kind in ("prefix", "suffix"):
        for count in counts:
          rows.append({"family": family, "training": training, "kind": kind, "steps": count,
                       "rate": prompted_rate(family, models[family], kind, count, n,
                                             seed + 100)})
  return rows


def guidance_table(seed: int, scales=(0.0, 0.5, 1.0, 2.0, 4.0), train_steps: int = 600,
                   n: int = 512) -> list[dict]:
  """Rows {family, kind, guidance, rate}: one-step prompted_rate of the conditional FLM
  and FMLM of prompted_table at each classifier-free guidance scale."""
  teacher = fit("flm", "markov", train_steps, seed, condition="prefix,suffix")
  models = {"flm": teacher, "fmlm": fit("fmlm", "markov", train_steps, seed, teacher=teacher,
                                        condition="prefix,suffix")}
  return [{"family": family, "kind": kind, "guidance": w,
           "rate": prompted_rate(family, model, kind, 1, n, seed + 100, w)}
          for family, model in models.items() for kind in ("prefix", "suffix")
          for w in scales]


def main():
  parser = argparse.ArgumentParser(prog="flmjax.toys", description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--sources", default="phrases,markov",
                      help="the sources of the table (not of --prompted or --guidance)")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--prompted", action="store_true",
                    help="the prompted markov rates (prompted_table) instead")
  mode.add_argument("--guidance", action="store_true",
                    help="the one-step prompted rates against guidance (guidance_table)")
  args = parser.parse_args()
  unknown = [s for s in args.sources.split(",") if s not in SOURCES]
  if unknown:
    parser.error(f"--sources={args.sources}: {unknown[0]!r} is not one of "
                 f"{', '.join(SOURCES)}")
  if args.guidance:
    print(f"prompted markov, one step, seed {args.seed}:\n| family | given | guidance | rate |"
          "\n|---|---|---|---|")
    for row in guidance_table(args.seed):
      print(f"| {row['family']} | {row['kind']} | {row['guidance']} | {row['rate']:.3f} |",
            flush=True)
    return
  if args.prompted:
    print(f"prompted markov, seed {args.seed}:\n| family | training | given | steps | rate |"
          "\n|---|---|---|---|---|")
    for row in prompted_table(args.seed):
      print(f"| {row['family']} | {row['training']} | {row['kind']} | {row['steps']} | "
            f"{row['rate']:.3f} |", flush=True)
    return
  for source in args.sources.split(","):
    print(f"{source}, seed {args.seed}:\n| family | steps | calls | score |\n|---|---|---|---|")
    for row in table(source, args.seed):
      print(f"| {row['family']} | {row['steps'] or '-'} | {row['calls']} | "
            f"{row['score']:.3f} |", flush=True)


if __name__ == "__main__":
  main()
