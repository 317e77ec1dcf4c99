"""launch/*.sh: argument checks, and the commands their --dry-run prints."""

import json
import os
import pathlib
import shlex
import subprocess
import tempfile

import pytest

from flmjax.modes import MODES
from flmjax.models import flash

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launch(script, *args, env=None, cwd=ROOT):
  run = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=cwd,
                       capture_output=True, text=True, check=False,
                       env=dict(os.environ, **(env or {})))
  commands = [shlex.split(line[2:]) for line in run.stdout.splitlines() if line.startswith("+ ")]
  return run, commands


def test_tpu_pod_dry_run_creates_installs_and_runs_on_every_worker():
  run, commands = _launch("tpu_pod.sh", "--name=flm-owt", "--zone=us-east5-a",
                          "--accelerator=v5litepod-64", "--version=v2-alpha-tpuv5-lite",
                          "--workdir=gs://bucket/owt", "--mode=train", "--dry-run", "--",
                          "--config.mesh.fsdp=8")
  assert run.returncode == 0, run.stderr
  archive, create, scp, install, main = commands  # packed before the slice is created
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "flm-owt",
                    "--zone=us-east5-a", "--accelerator-type=v5litepod-64",
                    "--version=v2-alpha-tpuv5-lite"]
  assert archive[:2] == ["git", "-C"] and archive[3:5] == ["archive", "--format=tar.gz"]
  assert scp[4:6] == ["scp", archive[-2]] and "--worker=all" in scp
  assert install[4:6] == ["ssh", "flm-owt"] and "--worker=all" in install
  assert install[-1].endswith("uv venv -q --python 3.11 --allow-existing flmjax-venv && "
                              "python3 -m uv pip install -q --python flmjax-venv/bin/python "
                              "-e 'flmjax[tpu,hf]'")
  assert main[4:6] == ["ssh", "flm-owt"] and "--worker=all" in main
  remote = shlex.split(main[-1].removeprefix("--command="))
  assert remote == ["cd", "flmjax", "&&", "../flmjax-venv/bin/python", "-m", "flmjax.main",
                    "--config=configs/owt.py", "--workdir=gs://bucket/owt", "--mode=train",
                    "--config.distributed=True", "--config.data.dir=/tmp/flmjax-data",
                    "--config.mesh.fsdp=8"]


def test_tpu_pod_refuses_a_local_workdir_and_bad_types():
  base = ["--name=flm", "--zone=z", "--version=v", "--dry-run"]
  run, _ = _launch("tpu_pod.sh", *base, "--accelerator=v5p-32", "--workdir=/tmp/x")
  assert run.returncode == 2 and "use a Cloud Storage path gs://BUCKET/DIR" in run.stderr
  run, _ = _launch("tpu_pod.sh", *base, "--accelerator=v5p", "--workdir=gs://b/x")
  assert run.returncode == 2 and "--accelerator=v5p: a TPU type" in run.stderr
  run, _ = _launch("tpu_pod.sh", "--zone=z", "--dry-run")
  assert run.returncode == 2 and "are required" in run.stderr
  # the workers get the last commit: a config outside it would not be there
  with tempfile.NamedTemporaryFile(suffix=".py") as outside:
    run, _ = _launch("tpu_pod.sh", *base, "--accelerator=v5p-32", "--workdir=gs://b/x",
                     f"--config={outside.name}")
  assert run.returncode == 2 and f"not in this checkout ({ROOT})" in run.stderr
  with tempfile.NamedTemporaryFile(suffix=".py", dir=ROOT / "configs") as uncommitted:
    run, _ = _launch("tpu_pod.sh", *base, "--accelerator=v5p-32", "--workdir=gs://b/x",
                     f"--config={uncommitted.name}")
  assert run.returncode == 2 and "not in this checkout's last commit" in run.stderr
  # run from elsewhere: the workers read the config at its path in the repository
  run, commands = _launch("tpu_pod.sh", *base, "--accelerator=v5p-32", "--workdir=gs://b/x",
                          "--config=../configs/tiny.py", cwd=ROOT / "launch")
  assert run.returncode == 0, run.stderr
  assert "--config=configs/tiny.py" in shlex.split(commands[-1][-1].removeprefix("--command="))


def test_gpu_single_host_dry_run():
  run, [command] = _launch("gpu_single_host.sh", "--workdir=/tmp/run", "--gpus=0,1",
                           "--mode=distill", "--dry-run", "--",
                           "--config.teacher_checkpoint=/tmp/teacher",
                           env={"XLA_FLAGS": "--xla_dump_to=/tmp/dump"})
  assert run.returncode == 0, run.stderr
  assert command == [
      "env", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/dump",
      "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1", "python", "-m",
      "flmjax.main", f"--config={ROOT}/configs/owt.py", "--workdir=/tmp/run", "--mode=distill",
      "--config.teacher_checkpoint=/tmp/teacher"]
  run, _ = _launch("gpu_single_host.sh", "--workdir=/tmp/run", "--gpus=all", "--dry-run")
  assert run.returncode == 2 and "--gpus=all: GPU indices" in run.stderr
  run, _ = _launch("gpu_single_host.sh", "--workdir=/tmp/run", "--zone=z", "--dry-run")
  assert run.returncode == 2 and "unknown argument --zone=z" in run.stderr
  run, _ = _launch("gpu_single_host.sh", "--workdir=/tmp/run", "--mode=fit", "--dry-run")
  assert run.returncode == 2 and "--mode=fit: one of prepare" in run.stderr


def test_launchers_accept_every_mode_of_main_and_help_exits_0():
  for mode in MODES:
    run, [command] = _launch("gpu_single_host.sh", "--workdir=/tmp/run",
                             "--config=configs/tiny.py", f"--mode={mode}", "--dry-run")
    assert run.returncode == 0 and f"--mode={mode}" in command, run.stderr
  for script in ("tpu_pod.sh", "gpu_single_host.sh", "slurm_gpu.sh"):
    run, _ = _launch(script, "--help")
    assert run.returncode == 0 and "--workdir" in run.stdout


def test_slurm_dry_run_starts_one_process_per_gpu():
  run, [command] = _launch("slurm_gpu.sh", "--nodes=4", "--gpus-per-node=8",
                           "--workdir=/shared/owt", "--partition=gpu", "--time=12:00:00",
                           "--dry-run", env={"XLA_FLAGS": ""})
  assert run.returncode == 0, run.stderr
  assert command[:7] == ["srun", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                         "--kill-on-bad-exit=1", "--partition=gpu", "--time=12:00:00"]
  assert command[7:10] == ["env", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
                           "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]
  assert command[10:] == ["python", "-m", "flmjax.main", f"--config={ROOT}/configs/owt.py",
                          "--workdir=/shared/owt", "--mode=train", "--config.distributed=True",
                          "--config.data.dir=/tmp/flmjax-data"]
  run, _ = _launch("slurm_gpu.sh", "--nodes=0", "--workdir=/shared/owt", "--dry-run")
  assert run.returncode == 2 and "--nodes=0: a positive integer" in run.stderr
  run, _ = _launch("slurm_gpu.sh", "--nodes=2", "--workdir=runs/owt", "--dry-run")
  assert run.returncode == 2 and "an absolute path on a shared filesystem" in run.stderr
  for time, status in (("UNLIMITED", 0), ("2-00:00:00", 0), ("12h", 2)):
    run, _ = _launch("slurm_gpu.sh", "--nodes=2", "--workdir=/shared/owt", f"--time={time}",
                     "--dry-run")
    assert run.returncode == status, (time, run.stderr)


def test_gpu_bench_dry_run_lists_the_check_the_sweep_then_the_two_shapes_before_and_after():
  run, (check, sweep, *commands) = _launch("gpu_bench.sh", "--dry-run", "--",
                                           "--config.model.dtype=bfloat16",
                                           env={"JAX_PLATFORMS": ""})
  assert run.returncode == 0, run.stderr
  assert check[:2] == ["env", "JAX_PLATFORMS=cuda"] and "tests/test_dit.py" in check
  assert check[-1] == "kernels_equal and flash-False-bfloat16"
  assert sweep[:3] == ["python3", "-m", "flmjax.bench"] and "--config.data.seq_len=1024" in sweep
  tiles = next(arg for arg in sweep if arg.startswith("--flash_sweep="))[len("--flash_sweep="):]
  assert len(tiles.split(",")) == 6 and all(
      128 % t.block == 0 and 128 % t.step == 0 for t in map(flash.Tile.parse, tiles.split(",")))
  assert sweep[-1] == "--config.model.dtype=bfloat16"
  assert len(commands) == 4
  for command, (vocab, head, attention) in zip(commands, [
      (8192, "plain", "plain"), (8192, "auto", "flash"), (50258, "plain", "plain"),
      (50258, "auto", "flash")]):
    assert command[:3] == ["python3", "-m", "flmjax.bench"]
    assert f"--vocab_size={vocab}" in command and f"--config.model.output_head={head}" in command
    assert f"--config.model.attention={attention}" in command
    assert any(arg.startswith("--profile=") for arg in command) == (head == "auto")
    assert ("--config.model.flash_tiles=<the sweep's best>" in command) == (head == "auto")
    assert command[-1] == "--config.model.dtype=bfloat16"
  assert "--config.data.seq_len=1024" in commands[2] and "--sample_batch=64" in commands[2]
  run, _ = _launch("gpu_bench.sh", "--size=huge")
  assert run.returncode == 2 and "--size=huge: gpu or tiny" in run.stderr
  run, _ = _launch("gpu_bench.sh", "--timeout=0")
  assert run.returncode == 2 and "--timeout=0: seconds, a positive integer" in run.stderr


@pytest.mark.slow
def test_gpu_bench_reports_a_failed_run_and_goes_on_to_the_next():
  """The GPU's time is scarce: a run that fails (here the four bench runs, on a step count
  the sweep does not read, or all, past the time limit) is a JSON line with its error, the
  others still run, and the script exits 1. The "after" runs take the sweep's best tiles."""
  one_device = {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8", "")}  # as on a GPU host: batches of 2
  run, _ = _launch("gpu_bench.sh", "--size=tiny", "--", "--sample_steps=0", env=one_device)
  assert run.returncode == 1
  check, sweep, *lines = [json.loads(line) for line in run.stdout.splitlines()]
  assert check["check"] == "flash_bfloat16" and check["passed"] is True
  assert sweep["sweep"] == "flash" and sweep["shape"] == [2, 128, 2, 16]
  assert {row["tile"] for row in sweep["rows"]} == {"64x64/4/2", "32x64/4/2"}
  assert [(d["shape"], d["code"], d.get("flash_tiles")) for d in lines] == [
      ("small", "before", None), ("small", "after", sweep["best"]), ("owt", "before", None),
      ("owt", "after", sweep["best"])]
  assert all(d["error"] == "exit 2" for d in lines)
  assert run.stderr.count("flmjax.bench: error: --sample_steps='0' must be") == 4
  run, _ = _launch("gpu_bench.sh", "--size=tiny", "--timeout=1")
  assert run.returncode == 1
  assert [json.loads(line)["error"] for line in run.stdout.splitlines()] == [
      "timed out after 1 s"] * 6
