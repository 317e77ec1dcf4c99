"""Sampling and evaluation of trained weights: `--mode=sample`.

Weights come from `config.checkpoint`: a training or distillation workdir (the latest
checkpoint's EMA weights) or an export. The run record saved with them says which model
it is, so the sampler follows: the Euler sampler for an FLM teacher, the flow-map sampler
(with churn `sample.gamma`) for an FMLM student.
"""

import functools
import pathlib

from flax import nnx
import jax
import ml_collections

from flmjax import checkpoint, sampling, sharding, train
from flmjax.data.tokenizers import load_tokenizer
from flmjax.errors import UsageError
from flmjax.models import dit


def load(config: ml_collections.ConfigDict, directory: str):
  """(record, graphdef, EMA params, tokenizer) of the weights in `directory`, placed on
  the mesh of `config.mesh`."""
  record = checkpoint.read_record(directory)
  model = ml_collections.ConfigDict(record["config"]["model"])
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract = train.param_layout(
      lambda: dit.from_config(model, record["vocab_size"], nnx.Rngs(0)), mesh)
  params = checkpoint.load_ema(directory, abstract)
  return record, graphdef, params, load_tokenizer(record["tokenizer"])


def sampler_for(record: dict, steps: int, num_samples: int, gamma: float, latent: bool):
  """(name, function (graphdef, params, rng) -> tokens) for the kind of model saved."""
  seq_len = record["config"]["data"]["seq_len"]
  if record["kind"] == "fmlm":
    return f"flowmap_{steps}", functools.partial(
        sampling.sample_flow_map, batch_size=num_samples, seq_len=seq_len, steps=steps,
        gamma=gamma, latent=latent)
  return f"euler_{steps}", functools.partial(
      sampling.sample_flm, batch_size=num_samples, seq_len=seq_len, steps=steps,
      latent=latent)


def sample(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[str]]:
  """`--mode=sample`: writes WORKDIR/samples/NAME.json with decoded samples and the time
  per sample (measured on a second, compiled run)."""
  sharding.initialize_distributed(config)
  if not config.checkpoint:
    raise UsageError("--mode=sample needs --config.checkpoint=DIR, a training or "
                     "distillation workdir or an export.")
  path = train.check_workdir(workdir)
  record, graphdef, params, tokenizer = load(config, config.checkpoint)
  name, sampler = sampler_for(record, config.sample.steps, config.sample.num_samples,
                              config.sample.gamma, config.noise == "latent")
  jax.block_until_ready(sampler(graphdef, params, jax.random.PRNGKey(config.seed + 1)))
  out = path / "samples" / f"{name}.json"
  written = train.write_samples(out, {name: sampler}, graphdef, params, tokenizer,
                                jax.random.PRNGKey(config.seed))
  train.say(f"wrote {len(written[name])} samples of the {record['kind']} model in "
            f"{pathlib.Path(config.checkpoint)} to {out}")
  for text in written[name][:3]:
    train.say(f"  {text[:200]!r}")
  return written
