"""Multi-process training on one machine: 2 CPU processes x 4 devices (gloo collectives,
a localhost coordinator) against 1 process x 8 devices, on the same data/fsdp mesh and
global batches, with checkpoints restored across the two process counts."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(processes: int, data_dir, workdir, steps: int) -> dict[str, np.ndarray]:
  """Runs the worker in `processes` processes (8 devices in all); the final params."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
  workers = [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), str(i), str(processes),
       str(port), str(8 // processes), str(data_dir), str(workdir), str(steps)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  for worker in workers:
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, out + err[-3000:]
  with np.load(pathlib.Path(workdir) / "final.npz") as final:
    return dict(final)


def _assert_close(got: dict, expected: dict):
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_checkpoints_move_between_one_and_two_processes_and_training_matches(tmp_path, prepared):
  data_dir = prepared.path.parent
  # One process, 6 steps straight (checkpoints at 2, 4, 6): the reference.
  single = _train(1, data_dir, tmp_path / "single", 6)
  # Two processes resume its step-2 checkpoint to step 4; one process resumes theirs to 6.
  shutil.copytree(tmp_path / "single", tmp_path / "mixed")
  for step in ("4", "6"):
    shutil.rmtree(tmp_path / "mixed" / "checkpoints" / step)
  _train(2, data_dir, tmp_path / "mixed", 4)
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(tmp_path / "mixed" / "checkpoints" / "4" / "data"))
  _assert_close(_train(1, data_dir, tmp_path / "mixed", 6), single)
