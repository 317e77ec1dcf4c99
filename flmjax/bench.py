"""Benchmark: python -m flmjax.bench --config=configs/NAME.py [--vocab_size=V].

Times the FLM training step (forward + backward) and the Euler sampler at 1, 8 and 64
steps on random tokens, for latent and V-space noise, and prints one JSON object. Peak
memory is XLA's plan for each compiled computation (arguments + outputs + temporaries,
from `memory_analysis()`), so the variants are compared one by one in the same process.
"""

import functools
import json
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from flmjax import flow, sampling
from flmjax.models import dit
from flmjax.schedule import get_schedule

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "V; 0 takes config.tokenizer.vocab_size.")
_STEPS = flags.DEFINE_list("sample_steps", ["1", "8", "64"], "Sampler step counts to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each computation (median).")
flags.mark_flags_as_required(["config"])


def _time(fn, *args, repeats: int) -> dict:
  """Compile time, median run time and XLA's planned peak bytes of jitted fn(*args)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {"seconds": sorted(runs)[len(runs) // 2], "compile_seconds": compile_s,
          "peak_bytes": int(peak)}


def run(config, vocab_size: int, sample_steps: list[int], repeats: int) -> dict:
  batch, seq_len = config.batch_size, config.data.seq_len
  graphdef, params = nnx.split(dit.from_config(config.model, vocab_size, nnx.Rngs(0)))
  schedule = get_schedule(vocab_size)
  tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, vocab_size)
  result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "vocab_size": vocab_size, "batch_size": batch, "seq_len": seq_len,
            "width": config.model.width, "depth": config.model.depth,
            "dtype": config.model.dtype}

  def loss_and_grad(params, tokens, rng, latent):
    def loss(params):
      model = nnx.merge(graphdef, params)
      return flow.flm_loss(lambda h, tau, key: model(h, tau, dropout_rng=key),
                           model.vocab_embed[...], tokens, rng, schedule, latent=latent)[0]
    return jax.value_and_grad(loss)(params)

  for noise in ("latent", "vocab"):
    latent = noise == "latent"
    train = _time(jax.jit(functools.partial(loss_and_grad, latent=latent)), params, tokens,
                  jax.random.key(1), repeats=repeats)
    train["tokens_per_second"] = batch * seq_len / train["seconds"]
    entry = {"train_step": train}
    for steps in sample_steps:
      tau, coeff = sampling.euler_grid(vocab_size, steps)
      fn = jax.jit(lambda params, rng, tau, coeff, latent=latent: sampling.euler_tokens(
          graphdef, params, rng, tau, coeff, batch, seq_len, latent))
      timing = _time(fn, params, jax.random.key(2), jnp.asarray(tau),
                     jnp.asarray(coeff), repeats=repeats)
      timing["seconds_per_sample"] = timing["seconds"] / batch
      entry[f"sample_{steps}_steps"] = timing
    result[noise] = entry
  return result


def main(argv):
  del argv
  config = _CONFIG.value
  vocab_size = _VOCAB.value or config.tokenizer.vocab_size
  print(json.dumps(run(config, vocab_size, [int(s) for s in _STEPS.value], _REPEATS.value),
                   indent=1))


if __name__ == "__main__":
  app.run(main)
