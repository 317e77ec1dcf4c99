"""python -m flmjax.bench runs end to end at a tiny size and reports sane figures."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_reports_throughput_utilisation_sampling_memory_and_profile(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "flmjax.bench", "--config=configs/tiny.py", "--vocab_size=512",
       "--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2",
       "--config.model.cond_width=16", "--config.data.seq_len=16", "--config.batch_size=8",
       "--sample_steps=1,2", "--noise=latent", "--repeats=2", f"--profile={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout)
  assert (result["vocab_size"], result["batch_size"], result["seq_len"]) == (512, 8, 16)
  train = result["latent"]["train"]
  assert train["step_seconds"] > 0 and train["compile_seconds"] > 0
  assert train["tokens_per_second"] == pytest.approx(8 * 16 / train["step_seconds"])
  assert 0 < train["mfu"] < 1 and train["planned_bytes"] > 0
  assert sum(train["shares"].values()) == pytest.approx(1.0)
  assert min(train["shares"][part] for part in ("attention", "mlp", "output_head")) > 0
  assert list((tmp_path / "latent").glob("**/*.xplane.pb"))
  for steps in (1, 2):
    sampler = result["latent"][f"sample_{steps}_steps"]
    assert sampler["seconds_per_sample"] > 0 and sampler["planned_bytes"] > 0
  assert result["process_peak_rss_bytes"] > train["planned_bytes"]


_UTILISATION = """
import json
import jax
from configs import tiny
from flmjax import aot, bench
bench._runs = lambda fn, args, repeats: [0.5] * repeats
aot.CHIPS[jax.devices()[0].device_kind] = (1 << 30, 1e12, 1e11)
config = tiny.get_config()
config.model.update(width=32, depth=1, heads=2, cond_width=16, dtype="float32")
config.data.seq_len, config.batch_size = 32, 8
print(json.dumps(bench.run(config, 61, [], ["latent"], repeats=1)))
"""


@pytest.mark.slow
def test_utilisation_is_model_flops_over_the_measured_and_published_peaks():
  """With every timed run taking 0.5 s: the matmul peak is 2 n^3 FLOPs on each of the 8
  devices per 0.5 s (n = 2048 and one product per run on a CPU), tokens/s is B L / 0.5,
  the MFU their model FLOPs over the better peak, and on a chip of aot.CHIPS (here the
  CPU, listed at 1 TFLOP/s) also over its published peak times the devices. (A
  subprocess: the bench's command-line flags would clash with those of the other entry
  points imported here.)"""
  run = subprocess.run([sys.executable, "-c", _UTILISATION], cwd=ROOT, capture_output=True,
                       text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.splitlines()[-1])
  assert result["device_count"] == 8
  peak = 2 * 2048**3 * 8 / 0.5
  assert result["matmul_peak_flops"] == {"float32": peak, "bfloat16": peak}
  train = result["latent"]["train"]
  assert train["tokens_per_second"] == 8 * 32 / 0.5
  model_flops = result["model_flops_per_token"] * 8 * 32 / 0.5
  assert train["mfu"] == pytest.approx(model_flops / peak)
  assert train["mfu_of_published_peak"] == pytest.approx(model_flops / (1e12 * 8))


_SWEEP = """
import json, sys
from configs import tiny
from flmjax import bench
from flmjax.models import flash
dq = flash.dq
def wrong_at_step_32(*args, tile, **kwargs):  # a tile whose dq is off by 1
  got = dq(*args, tile=tile, **kwargs)
  return tuple(x + 1 for x in got) if tile.step == 32 else got
flash.dq = wrong_at_step_32
config = tiny.get_config()
config.model.update(width=32, heads=2, dtype="float32")
config.data.seq_len, config.batch_size = 128, 2
tiles = [flash.Tile.parse(t) for t in sys.argv[1:]]
print(json.dumps(bench.sweep_flash(config, tiles, repeats=1)))
"""


@pytest.mark.slow
def test_flash_sweep_times_each_kernel_at_each_tile_and_picks_the_fastest_right_one():
  """Each kernel at its default tile, then at each given one: a tile whose block or step
  does not divide L is an error, tiles compute the same (float32, interpret mode) but for
  one made wrong, and `best` takes each kernel's fastest tile among the right ones. (A
  subprocess, as above.)"""
  given = ["32x64/4/2", "128x32/8/3", "256x64/4/2", "64x64/4/2"]
  run = subprocess.run([sys.executable, "-c", _SWEEP, *given], cwd=ROOT,
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.splitlines()[-1])
  assert result["shape"] == [2, 128, 2, 16] and result["default"] == "64x64/4/2,64x64/4/2,64x64/4/2"
  rows = result["rows"]
  assert [(r["kernel"], r["tile"]) for r in rows] == [
      (kernel, tile) for kernel in ("forward", "dkv", "dq")
      for tile in ("64x64/4/2", "32x64/4/2", "128x32/8/3", "256x64/4/2")]
  fastest = {}
  for row in rows:
    if row["tile"] == "256x64/4/2":
      assert row["error"] == "L 128 is not a multiple of the block and step"
      continue
    wrong = row["kernel"] == "dq" and row["tile"] == "128x32/8/3"
    assert (row["difference"] > 0.5) if wrong else (row["difference"] < 1e-5), row
    assert row["seconds"] > 0 and row["tflops"] > 0
    if not wrong and row["seconds"] < fastest.get(row["kernel"], (float("inf"),))[0]:
      fastest[row["kernel"]] = row["seconds"], row["tile"]
  assert result["best"] == ",".join(fastest[k][1] for k in ("forward", "dkv", "dq"))
  assert result["best_seconds"] == pytest.approx(sum(s for s, _ in fastest.values()))
  assert result["default_seconds"] == pytest.approx(
      sum(r["seconds"] for r in rows if r["tile"] == "64x64/4/2"))


@pytest.mark.slow
@pytest.mark.parametrize("field, message", [
    ("--config.family=mdlm", "family=mdlm: the bench times the FLM's"),
    ("--config.batch_size=7", "batch_size 7 must be a multiple"),
    ("--sample_steps=1,0", "--sample_steps='1,0' must be distinct positive step"),
    ("--repeats=0", "flag --repeats=0: 0 is not a positive integer"),
    ("--noise=latnet", "flag --noise=['latnet']: --noise takes latent, vocab or both"),
    ("--profile=setup.py", "--profile=setup.py: Not a directory: setup.py/latent; give a"),
    ("--flash_sweep=64x64", "--flash_sweep: '64x64' is not a tile BLOCKxSTEP/WARPS/STAGES"),
    ("--config.model.flash_tiles=64x64/4/2", "model.flash_tiles='64x64/4/2': '64x64/4/2' is not"
     " three tiles"),
    ("--config.model.width=96", "--flash_sweep: the flash kernels take head sizes (model.width"
     " / model.heads = 24)")])
def test_bench_refuses_a_baseline_family_and_a_bad_field(field, message):
  sweep = ["--flash_sweep=32x32/4/2"] if "width" in field else []
  run = subprocess.run([sys.executable, "-m", "flmjax.bench", "--config=configs/tiny.py",
                        field, *sweep], cwd=ROOT, capture_output=True, text=True, check=False)
  assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
