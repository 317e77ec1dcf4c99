"""The command line, run as a user runs it."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.data.max_documents=300", "--config.tokenizer.vocab_size=512",
         "--config.data.seq_len=32", "--config.batch_size=8"]


def _main(workdir, *args):
  return subprocess.run(
      [sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def _error_line(run) -> str:
  """The one line a usage error prints (JAX's TPU library may log lines before it)."""
  lines = [l for l in run.stderr.splitlines() if l.startswith("flmjax: error: ")]
  assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
  return lines[0]


@pytest.mark.slow
def test_prepare_writes_the_shards_and_their_statistics(tmp_path):
  run = _main(tmp_path, "--mode=prepare", *SMALL)
  assert run.returncode == 0, run.stderr
  [meta_file] = (tmp_path / "data").glob("prepared-*/meta.json")
  meta = json.loads(meta_file.read_text())
  assert (meta["tokenizer"], meta["vocab_size"], meta["seq_len"]) == ("sentencepiece", 512, 32)
  assert meta["splits"]["train"]["examples"] > 8 and meta["splits"]["valid"]["documents"] > 0
  assert (meta_file.parent / "train-00000.array_record").is_file()


@pytest.mark.parametrize("args, message", [
    pytest.param(["--config.data.corpus=dir", "--config.data.path=/nonexistent/corpus"],
                 "data.path=/nonexistent/corpus does not exist", marks=pytest.mark.slow),
    (["--config.batch_size=0"], "batch_size=0 must be positive"),
    # (JAX's cluster discovery needs a process whose backend has not started)
    pytest.param(["--config.distributed=True"], "distributed=True, but JAX found no "
                 "multi-process cluster", marks=pytest.mark.slow),
    pytest.param(["--config.train.stpes=3"], "unknown config field 'train.stpes' (did you "
                 "mean 'train.steps'?)", marks=pytest.mark.slow),
    pytest.param(["--workdir="], "--workdir is empty", marks=pytest.mark.slow),
])
def test_bad_input_is_one_line_with_exit_status_2(tmp_path, args, message):
  assert message in _error_line(_main(tmp_path, "--mode=prepare", *SMALL, *args))


@pytest.mark.slow
def test_a_missing_config_file_is_one_line_and_help_exits_0(tmp_path):
  run = subprocess.run([sys.executable, "-m", "flmjax.main", "--config=configs/nope.py",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
  assert "--config=configs/nope.py: [Errno 2] No such file" in _error_line(run)
  # from another working directory the configs still import each other (configs.*): the
  # config loaded, and its field is checked
  run = subprocess.run([sys.executable, "-m", "flmjax.main", f"--config={ROOT}/configs/tiny.py",
                        f"--workdir={tmp_path}", "--config.nope=1"], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
  assert "unknown config field 'nope'" in _error_line(run)
  run = subprocess.run([sys.executable, "-m", "flmjax.main", "--help"], cwd=ROOT,
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0 and "--mode" in run.stdout


TRAIN = SMALL + ["--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2",
                 "--config.model.cond_width=16", "--config.train.log_every=1",
                 "--config.train.warmup_steps=2", "--config.train.eval_every=0",
                 "--config.train.eval_batches=2", "--config.train.sample_every=0",
                 "--config.train.num_samples=2", "--config.train.sample_steps=2"]


# The pipeline's distillation and evaluation, shrunk (teacher stage: TRAIN).
REST = ["--config.distill.steps=2", "--config.eval.num_samples=4",
        "--config.eval.reference_samples=4", "--config.eval.teacher_steps=1,2",
        "--config.eval.student_steps=1"]


@pytest.mark.slow
def test_sigterm_ends_the_pipeline_which_then_resumes_to_its_end_and_reruns_nothing(tmp_path):
  process = subprocess.Popen(
      [sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--mode=pipeline", "--config.train.steps=100000",
       "--config.train.checkpoint_every=0", *TRAIN, *REST, "--config.train.eval_every=1"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  teacher = tmp_path / "teacher"
  metrics = teacher / "metrics.jsonl"
  for line in process.stdout:
    if line.startswith("step 3/"):
      process.send_signal(signal.SIGTERM)
      break
  _, err = process.communicate(timeout=120)
  assert process.returncode == 143, err  # unfinished: 128 + SIGTERM
  step = max(int(p.name) for p in (teacher / "checkpoints").iterdir())  # saved on SIGTERM
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert step >= 3 and lines[-1]["step"] == step  # the step it stopped at, logged and saved
  # validated at every step before it, not at the stop (which saves at once)
  assert {l["step"] for l in lines if "valid_loss" in l} == set(range(1, step))
  assert not (tmp_path / "student").exists()  # the pipeline stopped with the teacher
  assert json.loads((teacher / "config.json").read_text())["config"]["train"]["steps"] == 100000

  # The same command with fewer teacher steps: the teacher resumes and ends, then the
  # student is distilled, exported and evaluated.
  args = ["--mode=pipeline", f"--config.train.steps={step + 2}", *TRAIN, *REST]
  run = _main(tmp_path, *args)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [l["step"] for l in lines if "loss" in l][-3:] == [step, step + 1, step + 2]
  assert "valid_loss" in lines[-1]
  samples = json.loads((teacher / "samples" / f"step_{step + 2}.json").read_text())
  assert len(samples["euler_2"]["samples"]) == 2
  rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
  assert [(r["model"], r["sampler"]) for r in rows] == [
      ("FLM", "euler_1"), ("FLM", "euler_2"), ("FMLM", "flowmap_1"),
      ("dataset", "validation split")]
  assert (tmp_path / "student" / "export" / "record.json").is_file()
  assert (tmp_path / "eval" / "gen_ppl.png").is_file()

  logged = {path: (tmp_path / path).read_text() for path in (
      "teacher/metrics.jsonl", "student/metrics.jsonl", "eval/results.json")}
  again = _main(tmp_path, *args)
  assert again.returncode == 0, again.stderr[-3000:]
  # both stages resumed at their end (no step again), the evaluation kept
  for path, text in logged.items():
    assert (tmp_path / path).read_text() == text
  assert "results.json already holds this evaluation: kept" in again.stdout


@pytest.mark.slow
def test_compiling_for_a_slice_writes_nothing_to_the_compilation_cache(tmp_path):
  """An executable compiled for a TPU slice without it cannot be loaded back from the
  persistent compilation cache (JAX warns and compiles again), so --mode=compile for a
  topology writes none there; compiling for the local devices does."""
  pytest.importorskip("libtpu", reason='needs libtpu: pip install -e ".[tpu]"')
  small = ["--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2",
           "--config.data.seq_len=32", "--config.batch_size=8",
           "--config.family=ar"]  # a baseline: its train step only
  for topology in ("v5e:2x2", ""):
    cache = tmp_path / f"cache{topology}"
    run = subprocess.run(
        [sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
         f"--workdir={tmp_path / topology}", "--mode=compile",
         f"--config.topology={topology}", *small], cwd=ROOT, capture_output=True, text=True,
        check=False, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
                              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / topology / "compile.json").exists()
    assert bool(cache.exists() and any(cache.iterdir())) == (topology == ""), topology
