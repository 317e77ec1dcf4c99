"""The command line, run as a user runs it."""

import pathlib
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
