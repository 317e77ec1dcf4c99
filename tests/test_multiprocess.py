"""Multi-process training on one machine: 2 CPU processes x 4 devices (gloo collectives,
a localhost coordinator) between runs of this process's 8 devices, on the same data/fsdp
mesh and global batches, with checkpoints restored across the two process counts and a
stop on SIGTERM that both processes agree on."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import mesh_config
from flmjax import train
from flmjax.errors import STOPPED_STATUS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_in_two_processes(data_dir, workdir, steps: int, stop: bool = False) -> list[int]:
  """The exit statuses of two processes training to `steps`; with `stop`, process 1
  (only) gets SIGTERM once process 0 has said which run it starts, before the first step
  (while the data are prepared and the step compiled)."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
  # Their logs go to files: a pipe that fills would stop a worker, and its collectives
  # the other one.
  logs = [pathlib.Path(workdir).parent / f"worker_{i}.log" for i in range(2)]
  workers = [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), str(i), "2",
       str(port), "4", str(data_dir), str(workdir), str(steps)],
      cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
      for i, log in enumerate(logs)]
  deadline = time.time() + 300
  while stop and time.time() < deadline and workers[1].poll() is None:
    if "train flm in" in logs[0].read_text():
      workers[1].send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  try:
    codes = [worker.wait(timeout=300) for worker in workers]
  finally:
    for worker in workers:
      worker.kill()
  for code, log in zip(codes, logs):
    assert code in (0, STOPPED_STATUS), log.read_text()[-3000:]
  return codes


@pytest.mark.slow
def test_checkpoints_move_between_one_and_two_processes_and_training_matches(tmp_path, prepared):
  """Two processes resume a one-process run; SIGTERM to one of them before their first
  step stops both after it, saved; two processes resume that to the end, equal to the
  straight run (read back by one process)."""
  data_dir = prepared.path.parent
  # One process, 12 steps straight (checkpoints every 2, all kept): the reference.
  config = mesh_config(12, data_dir)
  config.train.keep_checkpoints = 6
  single = train.train(config, str(tmp_path / "single"))
  shutil.copytree(tmp_path / "single", tmp_path / "mixed")
  for step in range(4, 13, 2):
    shutil.rmtree(tmp_path / "mixed" / "checkpoints" / str(step))
  # Two processes resume its step-2 checkpoint; one of them gets SIGTERM before step 3.
  assert _train_in_two_processes(data_dir, tmp_path / "mixed", 12, stop=True) == [
      STOPPED_STATUS] * 2
  assert sorted(int(p.name) for p in (tmp_path / "mixed" / "checkpoints").iterdir()) == [2, 3]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(tmp_path / "mixed" / "checkpoints" / "3" / "data"))
  assert _train_in_two_processes(data_dir, tmp_path / "mixed", 12) == [0, 0]
  mixed = train.train(mesh_config(12, data_dir), str(tmp_path / "mixed"))  # restores 12
  for name in ("params", "ema"):
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(mixed[name]),
                                 jax.tree.leaves(single[name])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                 err_msg=name + jax.tree_util.keystr(path))
