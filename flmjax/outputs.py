"""What a run writes: its workdir, metrics.jsonl (and TensorBoard events), sample files, and
progress lines for the person running it (process 0 only).

Workdirs may be local or on cloud storage (gs://...): everything goes through etils.epath,
and files are replaced whole rather than appended to (cloud storage cannot append).
"""

import json
import math
import os
import time

from etils import epath
import jax

from flmjax.errors import UsageError


def say(message: str, every_process: bool = False) -> None:
  """A line for the person running the job: from process 0, or with `every_process` from
  whichever process does the work (prefixed with its index when there are several)."""
  if every_process and jax.process_count() > 1:
    print(f"process {jax.process_index()}: {message}", flush=True)
  elif jax.process_index() == 0:
    print(message, flush=True)


def create_workdir(workdir: str) -> epath.Path:
  """Creates the workdir and proves it writable, before anything is compiled."""
  path = epath.Path(workdir).expanduser()
  if path.is_file():
    raise UsageError(f"--workdir={workdir} is a file; give a directory.")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UsageError(f"--workdir={workdir} is not writable ({e.strerror}); choose another "
                     "directory.") from None
  return path


def write_text(path: epath.Path, text: str) -> None:
  """Replaces `path` whole with `text`: a killed write leaves the previous file."""
  partial = path.parent / (path.name + ".partial")
  partial.write_text(text)
  partial.replace(path)


def finite_or_null(value):
  """`value` with every NaN or infinite float as None: JSON has no such numbers (Python
  would write a bare NaN, which strict readers refuse), so an unscored metric is null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_null(v) for v in value]
  return value


def write_json(path: epath.Path, value) -> None:
  write_text(path, json.dumps(finite_or_null(value), indent=1, allow_nan=False))


class MetricsLog:
  """WORKDIR/metrics.jsonl, one JSON object per line, and TensorBoard scalars when
  tensorboardX is installed; written by process 0 only. A run resumed at step `start`
  keeps the lines of the steps up to it (those logged after it, by a run killed before
  it saved again, are logged anew)."""

  def __init__(self, workdir: epath.Path, start: int = 0):
    self.main = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    old = self.path.read_text().splitlines(True) if self.main and self.path.exists() else []
    self.lines = "".join(line for line in old if json.loads(line)["step"] <= start)
    self.tensorboard = None
    if self.main:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict) -> None:
    if not self.main:
      return
    self.lines += json.dumps(finite_or_null({"step": step, **metrics}), allow_nan=False) + "\n"
    write_text(self.path, self.lines)
    if self.tensorboard is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)):
          self.tensorboard.add_scalar(name, value, step)
      self.tensorboard.flush()


def write_samples(path: epath.Path, samplers: dict, graphdef, params, tokenizer,
                  rng, about: dict | None = None) -> dict[str, list[str]]:
  """Runs each sampler (graphdef, params, rng) -> (tokens [N, L], network calls), decodes
  the tokens and writes {name: {seconds_per_sample, network_calls, samples, **about}} to
  `path` as JSON (`about`: what wrote them). Seconds include compilation the first time a
  sampler runs."""
  written, record = {}, {}
  for name, sampler in samplers.items():
    start = time.perf_counter()
    tokens, calls = jax.device_get(sampler(graphdef, params, rng))
    seconds = time.perf_counter() - start
    written[name] = tokenizer.decode_batch(tokens)
    record[name] = {"seconds_per_sample": seconds / len(tokens), "network_calls": int(calls),
                    "samples": written[name], **(about or {})}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
  return written
