"""Multi-process training on one machine: 2 CPU processes x 4 devices (gloo collectives,
a localhost coordinator) between runs of this process's 8 devices, on the same data/fsdp
mesh and global batches, with checkpoints restored across the two process counts."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import mesh_config
from flmjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_in_two_processes(data_dir, workdir, steps: int) -> None:
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
  workers = [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), str(i), "2",
       str(port), "4", str(data_dir), str(workdir), str(steps)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for worker in workers:
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, out + err[-3000:]


@pytest.mark.slow
def test_checkpoints_move_between_one_and_two_processes_and_training_matches(tmp_path, prepared):
  data_dir = prepared.path.parent
  # One process, 6 steps straight (checkpoints at 2, 4, 6): the reference.
  single = train.train(mesh_config(6, data_dir), str(tmp_path / "single"))
  # Two processes resume its step-2 checkpoint to step 4; one process resumes theirs to 6.
  shutil.copytree(tmp_path / "single", tmp_path / "mixed")
  for step in ("4", "6"):
    shutil.rmtree(tmp_path / "mixed" / "checkpoints" / step)
  _train_in_two_processes(data_dir, tmp_path / "mixed", 4)
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(tmp_path / "mixed" / "checkpoints" / "4" / "data"))
  mixed = train.train(mesh_config(6, data_dir), str(tmp_path / "mixed"))
  for name in ("params", "ema"):
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(mixed[name]),
                                 jax.tree.leaves(single[name])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                 err_msg=name + jax.tree_util.keystr(path))
