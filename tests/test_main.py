"""The command line, run as a user runs it."""

import json
import pathlib
import re
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.data.max_documents=300", "--config.tokenizer.vocab_size=512",
         "--config.data.seq_len=32", "--config.batch_size=8"]


def _main(workdir, *args):
  return subprocess.run(
      [sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_prepare_prints_statistics_and_a_decoded_batch(tmp_path):
  run = _main(tmp_path, "--mode=prepare", *SMALL)
  assert run.returncode == 0, run.stderr
  assert "with sentencepiece (V = 512, L = 32)" in run.stdout
  assert "train: " in run.stdout and " documents, " in run.stdout and " tokens, " in run.stdout
  assert "first training batch: int32 [8, 32]; example 0 starts [1, " in run.stdout
  assert "[1] '" in run.stdout  # two decoded examples
  assert list((tmp_path / "data").glob("prepared-*/train-00000.array_record"))


def test_bad_input_exits_with_a_message(tmp_path):
  run = _main(tmp_path, "--mode=prepare", "--config.data.corpus=dir",
              "--config.data.path=/nonexistent/corpus", *SMALL)
  assert run.returncode == 2
  assert "flmjax: error: data.path=/nonexistent/corpus does not exist" in run.stderr
  assert "Traceback" not in run.stderr


TRAIN = SMALL + ["--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2",
                 "--config.model.cond_width=16", "--config.train.log_every=1",
                 "--config.train.warmup_steps=2", "--config.train.eval_every=0",
                 "--config.train.eval_batches=2", "--config.train.sample_every=0",
                 "--config.train.num_samples=2", "--config.train.sample_steps=2"]


def test_sigterm_saves_ends_the_pipeline_and_train_resumes(tmp_path):
  process = subprocess.Popen(
      [sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--mode=pipeline", "--config.train.steps=100000",
       "--config.train.checkpoint_every=0", *TRAIN],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  teacher = tmp_path / "teacher"
  metrics = teacher / "metrics.jsonl"
  for line in process.stdout:
    if line.startswith("step 3/"):
      process.send_signal(signal.SIGTERM)
      break
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  saved = re.search(r"SIGTERM: saved step (\d+)", out)
  assert saved, out
  step = int(saved.group(1))
  assert (teacher / "checkpoints" / str(step)).is_dir()
  assert not (tmp_path / "student").exists()  # the pipeline stopped with the teacher
  assert json.loads((teacher / "config.json").read_text())["config"]["train"]["steps"] == 100000
  run = _main(teacher, "--mode=train", f"--config.train.steps={step + 2}",
              f"--config.data.dir={tmp_path / 'data'}", *TRAIN)
  assert run.returncode == 0, run.stderr
  assert f"resumed from {teacher / 'checkpoints'} at step {step}" in run.stdout
  assert f"step {step + 2}/{step + 2}" in run.stdout
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [l["step"] for l in lines if "loss" in l][-3:] == [step, step + 1, step + 2]
  assert "valid_loss" in lines[-1]
  samples = json.loads((teacher / "samples" / f"step_{step + 2}.json").read_text())
  assert len(samples["euler_2"]["samples"]) == 2


def test_unknown_config_field_is_named(tmp_path):
  run = _main(tmp_path, "--mode=train", "--config.train.stpes=3")
  assert run.returncode == 2
  assert "flmjax: error: unknown config field" in run.stderr and "stpes" in run.stderr
  assert "Traceback" not in run.stderr
