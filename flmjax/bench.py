"""Benchmark: python -m flmjax.bench --config=configs/NAME.py [--vocab_size=V].

On random tokens, with the config's model, batch, L and mesh, it measures and prints as
JSON:
- the real training step (`train.train_step`: loss, gradients, clipping, AdamW, EMA):
  compile seconds, seconds per step, tokens/s, model FLOPs per token and model FLOPs
  utilisation against the matmul peak measured in the same run on the same devices;
- the Euler sampler: seconds per sample at each of --sample_steps;
- memory: XLA's plan for each compiled computation (arguments + outputs + temporaries)
  and the run's peak (device memory statistics where the backend has them, else the
  process's peak resident set size);
for latent noise and, for comparison, V-space noise (--noise).
"""

import json
import resource
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from flmjax import sampling, sharding, train
from flmjax.models import dit

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "V; 0 takes config.tokenizer.vocab_size.")
_STEPS = flags.DEFINE_list("sample_steps", ["1", "8"], "Sampler step counts to time.")
_NOISE = flags.DEFINE_list("noise", ["latent", "vocab"], "Noise paths to measure.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each computation (median).")
flags.mark_flags_as_required(["config"])


def _planned_bytes(compiled) -> int:
  memory = compiled.memory_analysis()
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def _median(runs: list[float]) -> float:
  return sorted(runs)[len(runs) // 2]


def matmul_peak(dtype, size: int, repeats: int) -> float:
  """FLOP/s of a square matmul on all devices (each multiplies its own pair)."""
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(jnp.ones((len(devices), size, size), dtype), spec)
  matmul = jax.jit(lambda a: jnp.einsum("nij,njk->nik", a, a,
                                        preferred_element_type=dtype)).lower(a).compile()
  jax.block_until_ready(matmul(a))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    runs.append(time.perf_counter() - start)
  return 2 * size**3 * len(devices) / _median(runs)


def _time_train(config, vocab_size: int, repeats: int) -> tuple[dict, tuple]:
  """Timing of the training step, and (graphdef, EMA params) for the samplers."""
  mesh = sharding.make_mesh(config.mesh)

  def params_fn():
    return dit.from_config(config.model, vocab_size, nnx.Rngs(0))

  run = train.plan(config, params_fn, mesh)
  state = train.init_state(run, train.random_params(run, params_fn), config.seed)
  tokens = jax.random.randint(jax.random.key(0), (config.batch_size, config.data.seq_len), 0,
                              vocab_size)
  batch = {"tokens": jax.device_put(tokens, sharding.batch_sharding(mesh))}
  objective = train.denoising_objective(config, vocab_size)
  start = time.perf_counter()
  compiled = train.compile_step(run, objective, config.train).lower(state, batch,
                                                                     None).compile()
  compile_seconds = time.perf_counter() - start
  train.release_host_memory()  # as train.fit does after compiling the step
  state, _ = compiled(state, batch, None)
  jax.block_until_ready(state)
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, None)
    jax.block_until_ready(metrics)
    runs.append(time.perf_counter() - start)
  seconds = _median(runs)
  return {"compile_seconds": compile_seconds, "step_seconds": seconds,
          "tokens_per_second": config.batch_size * config.data.seq_len / seconds,
          "planned_bytes": _planned_bytes(compiled)}, (run.graphdef, state["ema"])


def _time_sampler(graphdef, params, config, vocab_size, steps, latent, repeats) -> dict:
  batch, seq_len = config.batch_size, config.data.seq_len
  tau, coeff = sampling.euler_grid(vocab_size, steps)
  fn = jax.jit(lambda params, rng: sampling.euler_tokens(graphdef, params, rng, tau, coeff,
                                                         batch, seq_len, latent))
  compiled = fn.lower(params, jax.random.key(0)).compile()
  jax.block_until_ready(compiled(params, jax.random.key(0)))
  runs = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, jax.random.key(i)))
    runs.append(time.perf_counter() - start)
  return {"seconds_per_sample": _median(runs) / batch, "planned_bytes": _planned_bytes(compiled)}


def _peak_memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"device_peak_bytes": int(stats["peak_bytes_in_use"])}
  return {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(config, vocab_size: int, sample_steps: list[int], noises: list[str],
        repeats: int) -> dict:
  on_cpu = jax.default_backend() == "cpu"
  size = 2048 if on_cpu else 8192
  peaks = {name: matmul_peak(dtype, size, repeats)
           for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
  peak = max(peaks.values())
  flops_per_token = train.model_flops_per_token(config, vocab_size)
  result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "vocab_size": vocab_size,
            "batch_size": config.batch_size, "seq_len": config.data.seq_len,
            "width": config.model.width, "depth": config.model.depth,
            "heads": config.model.heads, "dtype": config.model.dtype,
            "matmul_peak_flops": peaks, "model_flops_per_token": flops_per_token}
  for noise in noises:
    config.noise = noise
    timing, (graphdef, params) = _time_train(config, vocab_size, repeats)
    timing["mfu"] = flops_per_token * timing["tokens_per_second"] / peak
    entry = {"train": timing}
    for steps in sample_steps:
      entry[f"sample_{steps}_steps"] = _time_sampler(graphdef, params, config, vocab_size,
                                                     steps, noise == "latent", repeats)
    result[noise] = entry
  result.update(_peak_memory())
  return result


def main(argv):
  del argv
  config = _CONFIG.value
  vocab_size = _VOCAB.value or config.tokenizer.vocab_size
  print(json.dumps(run(config, vocab_size, [int(s) for s in _STEPS.value], _NOISE.value,
                       _REPEATS.value), indent=1))


if __name__ == "__main__":
  app.run(main)
