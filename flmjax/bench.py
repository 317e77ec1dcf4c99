"""Benchmark: python -m flmjax.bench --config=configs/NAME.py [--vocab_size=V].

On random tokens, with the config's model, batch, L and mesh, it measures and prints as
JSON:
- the real training step (`state.train_step`: loss, gradients, clipping, AdamW, EMA):
  compile seconds, seconds per step, tokens/s, model FLOPs per token and model FLOPs
  utilisation against the matmul peak measured in the same run on the same devices
  (`mfu`; on a chip of aot.CHIPS also `mfu_of_published_peak`, against its spec sheet's
  dense peak, the usual definition);
- the Euler sampler: seconds per sample at each of --sample_steps (--sample_batch samples
  per call);
- memory: XLA's plan for each compiled computation (arguments + outputs + temporaries)
  and the run's peak (device memory statistics where the backend has them, else the
  process's peak resident set size);
for latent noise and, for comparison, V-space noise (--noise). `--profile=DIR` also writes a
profiler trace of the training step (DIR/NOISE, for TensorBoard or Perfetto) and reports
the share of the step's executed time in each part of the model (flmjax/profiling.py); on
GPUs it runs without XLA's command buffers, which would hide each kernel's instruction.

`--flash_sweep=TILE,...` times instead each kernel of the flash attention
(flmjax/models/flash.py: forward, dk and dv, dq) alone at the config's attention shape,
with its default tile and each given one (BLOCKxSTEP/WARPS/STAGES), and reports the
fastest of each kernel as `best`, the value of --config.model.flash_tiles that takes them
(see sweep_flash; on a CPU the kernels run in Pallas's interpret mode, which checks the
sweep, not the tiles).
"""

import functools
import json
import os
import resource
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from flmjax import aot, cli, objectives, profiling, sampling, sharding, state
from flmjax.errors import UsageError
from flmjax.models import dit, flash
from flmjax.validate import step_counts, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "V; 0 takes config.tokenizer.vocab_size.",
                               lower_bound=0)
_STEPS = flags.DEFINE_list("sample_steps", ["1", "8"], "Sampler step counts to time.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 0, "Samples per sampler call; 0 takes "
                                     "config.batch_size.", lower_bound=0)
NOISES = ("latent", "vocab")
_NOISE = flags.DEFINE_list("noise", list(NOISES), "Noise paths to measure: "
                           f"{', '.join(NOISES)} or both.")
flags.register_validator("noise", lambda value: bool(value) and set(value) <= set(NOISES),
                         message=f"--noise takes {', '.join(NOISES)} or both")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each computation (median).",
                                lower_bound=1)
_PROFILE = flags.DEFINE_string("profile", "", "Directory for a trace of the training step; "
                               "adds the share of its time in each part.")
_FLASH_SWEEP = flags.DEFINE_list(
    "flash_sweep", [], "Tiles BLOCKxSTEP/WARPS/STAGES at which to time each flash attention "
    "kernel alone at the config's attention shape, instead of the step and the samplers; "
    "reports the fastest (for model.flash_tiles).")
flags.mark_flags_as_required(["config"])


def matmul_peak(dtype, size: int, chain: int, repeats: int) -> float:
  """FLOP/s of square matmuls on all devices (each multiplies its own): the best of
  `repeats` calls, each a chain of `chain` dependent products (on an accelerator one
  product is short enough for the call's own overhead to count). Each product takes
  `dtype` operands and accumulates in float32, as the model's layers compute theirs
  (mixed_dot_general); some CPUs are several times faster at that than at products
  with bfloat16 results."""
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(jnp.full((len(devices), size, size), 1 / size, dtype), spec)

  def products(x, a):  # x @ a is x again: every entry stays 1 / size
    return jax.lax.fori_loop(0, chain, lambda _, x: jnp.einsum(
        "nij,njk->nik", x, a, preferred_element_type=jnp.float32).astype(dtype), x)
  compiled = jax.jit(products).lower(a, a).compile()
  return 2 * size**3 * chain * len(devices) / _runs(compiled, lambda i: (a, a), repeats)[0]


def _runs(fn, args, repeats: int) -> list[float]:
  """Seconds of fn(*args(i)) for `repeats` runs, after one untimed run, fastest first."""
  jax.block_until_ready(fn(*args(repeats)))
  runs = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args(i)))
    runs.append(time.perf_counter() - start)
  return sorted(runs)


def _timed(fn, args, repeats: int) -> float:
  """Median seconds of fn(*args(i)) over `repeats` runs, after one untimed run."""
  return _runs(fn, args, repeats)[repeats // 2]


def _time_train(config, vocab_size: int, repeats: int, profile: str) -> tuple[dict, tuple]:
  """Timing of the training step (and its profile into `profile`, if not ""), and
  (graphdef, EMA params) for the samplers."""
  build = dit.builder(config.model, vocab_size)
  layout = state.plan(config, build, sharding.make_mesh(config.mesh))
  train_state = state.init_state(layout, state.random_params(layout, build), config.seed)
  tokens = jax.random.randint(jax.random.key(0), (config.batch_size, config.data.seq_len), 0,
                              vocab_size)
  batch = {"tokens": jax.device_put(tokens, sharding.batch_sharding(layout.mesh))}
  start = time.perf_counter()
  compiled = state.compile_step(layout, objectives.denoising(config, vocab_size), config)
  compile_seconds = time.perf_counter() - start
  holder = [train_state]

  def step(_):  # the state is donated: each run takes the previous run's
    holder[0], metrics = compiled(holder[0], batch, None)
    return metrics

  seconds = _timed(step, lambda i: (i,), repeats)
  timing = {"compile_seconds": compile_seconds, "step_seconds": seconds,
            "tokens_per_second": config.batch_size * config.data.seq_len / seconds,
            "planned_bytes": aot.planned_bytes(compiled)}
  if profile:
    with jax.profiler.trace(profile):
      for i in range(repeats):
        jax.block_until_ready(step(i))
    timing["shares"] = profiling.shares(profile, compiled.as_text())
  return timing, (layout.graphdef, holder[0]["ema"])


def _time_sampler(graphdef, params, config, vocab_size, steps, latent, repeats,
                  batch) -> dict:
  seq_len = config.data.seq_len
  grid = sampling.euler_grid(vocab_size, steps)
  compiled = sampling.tokens.lower(graphdef, params, jax.random.key(0), grid,
                                   rule=sampling.EULER, batch_size=batch, seq_len=seq_len,
                                   latent=latent).compile()
  seconds = _timed(compiled, lambda i: (params, jax.random.key(i), grid), repeats)
  return {"seconds_per_sample": seconds / batch,
          "planned_bytes": aot.planned_bytes(compiled)}


# The largest difference from the default tile's outputs, relative to their largest
# magnitude, at which a tile counts as computing the same kernel: bfloat16's error (about
# 2% to 3% of the largest value against the plain path, tests/test_dit.py), not a wrong one.
SWEEP_TOLERANCE = 0.05


def sweep_flash(config, tiles: list[flash.Tile], repeats: int) -> dict:
  """Each flash kernel (forward, dkv, dq) timed alone on one device (a kernel call is one
  device's) with its default tile (flash.TILES) and each of `tiles`, at the config's
  attention shape [batch, L, heads, width / heads] in model.dtype: rows of its median
  seconds, TFLOP/s and largest difference from the default tile's outputs (relative to
  their largest magnitude), or the error of a tile that does not compile or fit L; then
  `best`, the fastest tile of each kernel within SWEEP_TOLERANCE, as model.flash_tiles
  takes them, with the kernels' summed seconds at the best and the default tiles."""
  model = config.model
  shape = (config.batch_size, config.data.seq_len, model.heads, model.width // model.heads)
  dtype, cap = jnp.dtype(model.dtype), float(model.attn_softcap)
  interpret = jax.default_backend() != "gpu"
  q, k, v, d_out = (jax.random.normal(key, shape, dtype)
                    for key in jax.random.split(jax.random.key(0), 4))
  out, lse = flash.forward(q, k, v, cap, flash.TILES.forward, interpret)
  backward = (q, k, v, d_out, lse, flash.row_delta(out, d_out))
  batch, seq_len, heads, head_dim = shape
  rows, best, default = [], {}, {}
  for kernel in flash.KERNELS:
    args = (q, k, v) if kernel == "forward" else backward

    def compiled(tile, kernel=kernel, args=args):
      return jax.jit(functools.partial(getattr(flash, kernel), cap=cap, tile=tile,
                                       interpret=interpret)).lower(*args).compile()
    default_tile = getattr(flash.TILES, kernel)
    expected = [x.astype(jnp.float32) for x in compiled(default_tile)(*args)]
    for tile in [default_tile, *(t for t in tiles if t != default_tile)]:
      row = {"kernel": kernel, "tile": str(tile)}
      rows.append(row)
      if seq_len % tile.block or seq_len % tile.step:
        row["error"] = f"L {seq_len} is not a multiple of the block and step"
        continue
      try:
        run = compiled(tile)
      except Exception as e:  # pylint: disable=broad-except
        # a tile the compiler refuses (out of shared memory, say) is a row, not the end
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        continue
      row["difference"] = max(float(jnp.abs(g.astype(jnp.float32) - e).max() / jnp.abs(e).max())
                              for g, e in zip(run(*args), expected))
      row["seconds"] = _timed(run, lambda i, args=args: args, repeats)
      row["tflops"] = flash.FLOPS[kernel] * batch * heads * seq_len**2 * head_dim / (
          row["seconds"] * 1e12)
      if tile == default_tile:
        default[kernel] = row["seconds"]
      if row["difference"] <= SWEEP_TOLERANCE and row["seconds"] < best.get(
          kernel, (float("inf"),))[0]:
        best[kernel] = row["seconds"], tile
  chosen = flash.Tiles(*(best.get(kernel, (None, getattr(flash.TILES, kernel)))[1]
                         for kernel in flash.KERNELS))
  return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "jax_version": jax.__version__, "shape": list(shape), "dtype": model.dtype,
          "softcap": cap, "rows": rows, "best": str(chosen), "default": str(flash.TILES),
          "best_seconds": sum(best[k][0] for k in best),
          "default_seconds": sum(default.values())}


def _peak_memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"device_peak_bytes": int(stats["peak_bytes_in_use"])}
  return {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(config, vocab_size: int, sample_steps: list[int], noises: list[str],
        repeats: int, profile: str = "", sample_batch: int = 0) -> dict:
  on_cpu = jax.default_backend() == "cpu"
  size, chain = (2048, 1) if on_cpu else (8192, 8)
  peaks = {name: matmul_peak(dtype, size, chain, repeats)
           for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
  peak = max(peaks.values())
  flops_per_token = dit.training_flops_per_token(config.model, vocab_size,
                                                 config.data.seq_len)
  result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "jax_version": jax.__version__,
            "device_count": jax.device_count(), "vocab_size": vocab_size,
            "batch_size": config.batch_size, "seq_len": config.data.seq_len,
            "width": config.model.width, "depth": config.model.depth,
            "heads": config.model.heads, "dtype": config.model.dtype,
            "sample_batch": sample_batch or config.batch_size,
            "matmul_peak_flops": peaks, "model_flops_per_token": flops_per_token}
  for noise in noises:
    config.noise = noise
    timing, (graphdef, params) = _time_train(
        config, vocab_size, repeats, profile and os.path.join(profile, noise))
    model_flops = flops_per_token * timing["tokens_per_second"]
    timing["mfu"] = model_flops / peak
    if result["device"] in aot.CHIPS:  # and against the chip's published dense peak
      timing["mfu_of_published_peak"] = model_flops / (
          aot.CHIPS[result["device"]][1] * jax.device_count())
    entry = {"train": timing}
    for steps in sample_steps:
      entry[f"sample_{steps}_steps"] = _time_sampler(
          graphdef, params, config, vocab_size, steps, noise == "latent", repeats,
          result["sample_batch"])
    result[noise] = entry
  result.update(_peak_memory())
  return result


def _flash_tiles(texts: list[str], config) -> list[flash.Tile]:
  """--flash_sweep's tiles, for the kernels at the config's head size."""
  try:
    tiles = [flash.Tile.parse(text) for text in texts]
  except ValueError as e:
    raise UsageError(f"--flash_sweep: {e}.") from None
  head = config.model.width // config.model.heads
  if tiles and not flash.takes_head(head):
    raise UsageError(f"--flash_sweep: the flash kernels take head sizes (model.width / "
                     f"model.heads = {head}) that are powers of two, at least 16.")
  return tiles


def main(argv):
  del argv
  if _PROFILE.value:
    # Before JAX starts its backends. On GPUs, XLA runs the step's kernels in command
    # buffers (CUDA graphs) by default, and the trace then names each kernel by its buffer
    # rather than its instruction: without them, every kernel counts in its part.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=")
  config = _CONFIG.value
  try:  # the config's training step, checked as --mode=train checks it
    if config.family != "flm":
      raise UsageError(f"family={config.family}: the bench times the FLM's training step "
                       "and Euler sampler; leave family at flm.")
    validate(config, "train", jax.device_count)
    tiles = _flash_tiles(_FLASH_SWEEP.value, config)
    if not tiles:  # the step and the samplers
      sample_steps = step_counts(",".join(_STEPS.value), "--sample_steps")
      for noise in _NOISE.value if _PROFILE.value else ():  # before minutes of timing
        try:
          os.makedirs(os.path.join(_PROFILE.value, noise), exist_ok=True)
        except OSError as error:
          raise UsageError(f"--profile={_PROFILE.value}: {error.strerror}: "
                           f"{error.filename}; give a directory that can be written.") from None
  except UsageError as e:
    cli.fail("flmjax.bench", str(e))
  if tiles:
    print(json.dumps(sweep_flash(config, tiles, _REPEATS.value), indent=1))
    return
  vocab_size = _VOCAB.value or config.tokenizer.vocab_size
  print(json.dumps(run(config, vocab_size, sample_steps, _NOISE.value, _REPEATS.value,
                       _PROFILE.value, _SAMPLE_BATCH.value), indent=1))


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags, program="flmjax.bench"))
