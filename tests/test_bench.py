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


@pytest.mark.slow
@pytest.mark.parametrize("field, message", [
    ("--config.family=mdlm", "family=mdlm: the bench times the FLM's"),
    ("--config.batch_size=7", "batch_size 7 must be a multiple"),
    ("--sample_steps=1,0", "--sample_steps='1,0' must be distinct positive step"),
    ("--repeats=0", "flag --repeats=0: 0 is not a positive integer"),
    ("--noise=latnet", "flag --noise=['latnet']: --noise takes latent, vocab or both"),
    ("--profile=setup.py", "--profile=setup.py: Not a directory: setup.py/latent; give a")])
def test_bench_refuses_a_baseline_family_and_a_bad_field(field, message):
  run = subprocess.run([sys.executable, "-m", "flmjax.bench", "--config=configs/tiny.py",
                        field], cwd=ROOT, capture_output=True, text=True, check=False)
  assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
