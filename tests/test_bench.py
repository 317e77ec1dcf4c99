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


def test_bench_refuses_a_baseline_family_and_a_bad_field():
  for field, message in (("--config.family=mdlm", "family=mdlm: the bench times the FLM's"),
                         ("--config.batch_size=7", "batch_size 7 must be a multiple")):
    run = subprocess.run([sys.executable, "-m", "flmjax.bench", "--config=configs/tiny.py",
                          field], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
