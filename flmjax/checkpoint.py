"""Orbax checkpoints: the train state, the Grain iterator position and the run's config.

Each step directory WORKDIR/checkpoints/STEP holds three items: `state` (step, params, EMA,
optimizer state, RNG), `data` (every process's Grain iterator state) and `config` (the run
record: kind, resolved config, V, tokenizer and git hash, as JSON). An export
(DIR/params + DIR/record.json) holds weights only, for sampling and as a teacher. Saving
is asynchronous; restoring places every array directly with the shardings of the current
mesh, so a run can resume on another device count. Directories may be local or on cloud
storage (gs://...): paths go through etils.epath, arrays through Orbax/TensorStore.
"""

import functools
import json
import logging as logging_std
import pathlib
import subprocess
import sys
import traceback
from typing import Callable
import warnings

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from flmjax import outputs
from flmjax.errors import UsageError

# Model settings that do not change the parameters: a checkpoint may be resumed, sampled
# or distilled with other values.
NOT_ARCHITECTURE = ("dropout", "dtype", "attention", "flash_tiles", "output_head",
                    "output_chunk", "remat", "mask_id")
# Model fields added after checkpoints were written, with the value an older record means.
ADDED = {"causal": False, "condition_embedding": False}
UNREADABLE = "unreadable_checkpoints"  # beside WORKDIR/checkpoints


def git_hash() -> str | None:
  """The commit of the flmjax checkout, if it is one."""
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent,
                          capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def run_record(config: ml_collections.ConfigDict, tokenizer, kind: str,
               data: str | None = None) -> dict:
  """What a checkpoint says about the run that wrote it: its kind (its family, e.g. "flm",
  or "fmlm" for an FMLM student), resolved config, V, tokenizer (to decode samples
  later), the name of the prepared data it trained on (None for imported weights) and
  commit."""
  return {"kind": kind, "config": json.loads(config.to_json_best_effort()),
          "vocab_size": tokenizer.vocab_size,
          "tokenizer": {"kind": tokenizer.kind, "source": tokenizer.source,
                        "fingerprint": tokenizer.fingerprint},
          "data": data, "git": git_hash()}


def check_compatible(saved: dict, *, kind: str, vocab_size: int | None, model: dict,
                     where: str, advice: str, tokenizer: str | None = None) -> None:
  """Refuses weights whose run kind, vocabulary (unless `vocab_size` is None), tokenizer
  (its fingerprint, unless `tokenizer` is None: same V, other ids) or architecture (the
  `model` settings but NOT_ARCHITECTURE) differ from what is expected; the message names
  each difference."""
  diffs = []
  if saved.get("kind") != kind:
    diffs.append(f"kind {saved.get('kind')!r} != {kind!r}")
  if vocab_size is not None and saved.get("vocab_size") != vocab_size:
    diffs.append(f"vocab_size {saved.get('vocab_size')} != {vocab_size}")
  if tokenizer is not None and saved["tokenizer"]["fingerprint"] != tokenizer:
    diffs.append(f"tokenizer {saved['tokenizer']['fingerprint'][:12]} != {tokenizer[:12]}")
  old = dict(ADDED, **saved["config"]["model"])
  model = dict(ADDED, **model)
  diffs += [f"model.{k} {old.get(k)!r} != {model.get(k)!r}"
            for k in sorted(set(old) | set(model))
            if k not in NOT_ARCHITECTURE and old.get(k) != model.get(k)]
  if diffs:
    raise UsageError(f"{where} holds weights of another kind, vocabulary, tokenizer or "
                     f"architecture ({'; '.join(diffs)}; saved != expected): {advice}.")


def check_same_data_order(saved: dict, record: dict, where: str) -> None:
  """Refuses to resume a run (whose run record is `saved`) with another data order than
  `record`'s: the saved position would index another sequence of batches. The order is
  the prepared data (their folder's name, a hash of the corpus, the tokenizer and L),
  batch_size and seed."""
  diffs = [f"{field} {saved['config'][field]!r} != {record['config'][field]!r}"
           for field in ("batch_size", "seed")
           if saved["config"][field] != record["config"][field]]
  if saved.get("data", record["data"]) != record["data"]:  # older records have no "data"
    diffs.append(f"prepared data {saved['data']} != {record['data']}")
  if diffs:
    raise UsageError(f"{where} holds a run with another data order ({'; '.join(diffs)}; "
                     "saved != now): resuming reads on from its saved position in that "
                     "order; use the run's data, batch_size and seed, or a new --workdir.")


def check_kept(saved: dict, keep_period: int, steps: list[int], where: str) -> None:
  """Refuses a train.keep_period under which the checkpoints `steps` in `where` that the
  saved run kept for good (its keep_period) would be deleted: Orbax deletes by the
  resumed run's policy, at its next save."""
  before = saved["config"]["train"].get("keep_period", 0)
  lost = [step for step in steps if before and step % before == 0
          and not (keep_period and step % keep_period == 0)]
  if lost:
    raise UsageError(f"{where} holds checkpoints {lost}, which its run keeps for good "
                     f"(train.keep_period={before}); with train.keep_period={keep_period} "
                     f"the next save would delete them: resume with train.keep_period="
                     f"{before}, or move them out of {where} first.")


def absolute(path: epath.Path) -> epath.Path:
  """Orbax needs absolute paths; a cloud path (gs://...) is one already."""
  return path if "://" in str(path) else path.absolute()


class Checkpoints:
  """An Orbax CheckpointManager over WORKDIR/checkpoints.

  Keeps the last `keep` checkpoints plus every `keep_period`-th step.
  """

  def __init__(self, directory: str | epath.Path, keep: int = 3, keep_period: int = 0):
    self.directory = epath.Path(directory)
    self.manager = ocp.CheckpointManager(
        absolute(self.directory), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None,
            enable_async_checkpointing=True, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, record: dict) -> None:
    """Starts an asynchronous save; `close` waits until it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
        config=ocp.args.JsonSave(record)), force=True)

  def newest_record(self) -> dict | None:
    """The run record of the newest checkpoint whose record can be read (None: none)."""
    for step in reversed(self.manager.all_steps()):
      try:
        return self.record(step)
      except Exception:  # pylint: disable=broad-except  # restore_latest reports it
        continue
    return None

  def record(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, abstract_state, iterator):
    """The train state placed as `abstract_state` says, and the iterator moved to where it
    was. When the checkpoint was written by another number of processes, every process
    continues from the global batch the step implies (one per step): the global batches
    do not depend on the number of processes (data/pipeline.py), so the data continue
    exactly."""
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
    data_file = (self.directory / str(step) / "data"
                 / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if data_file.is_file():
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(iterator)))
    else:
      logging.info("checkpoint %d was written by another number of processes; the data "
                   "continue from global batch %d", step, step)
      iterator.set_state({"next_index": step})
    return state

  def restore_latest(self, abstract_state, iterator,
                     check: Callable[[dict], None]) -> tuple[int, dict] | None:
    """(step, state) of the newest checkpoint, the iterator moved to it; None when there is
    none. `check(record)` may refuse a checkpoint's run record (raising).

    A newest checkpoint that cannot be read is reported in one line, moved aside to
    WORKDIR/unreadable_checkpoints/STEP (never deleted: the resumed run will save that step
    again) and the one before it is restored. If that one cannot be read either, the cause
    is more likely the storage or the installed Orbax than the files: the run stops, saying
    so, and nothing more is moved."""
    steps = self.manager.all_steps()
    if not steps:
      return None
    state, reason = self._attempt(steps[-1], abstract_state, iterator, check)
    if reason is None:
      return steps[-1], state
    moved = self._move_aside(steps[-1])
    outputs.say(f"flmjax: checkpoint {self.directory / str(steps[-1])} cannot be read "
                f"({reason}); moved it to {moved}")
    if len(steps) == 1:
      raise UsageError(f"the only checkpoint in {self.directory} could not be read (it is now "
                       f"in {moved}); rerun to start from step 0, or restore it.")
    state, second = self._attempt(steps[-2], abstract_state, iterator, check)
    if second is not None:
      raise UsageError(f"checkpoint {self.directory / str(steps[-2])} cannot be read either "
                       f"({second}); check the storage and the installed Orbax/TensorStore, "
                       f"then rerun (nothing more was moved; the newest is in {moved}).")
    return steps[-2], state

  def _attempt(self, step: int, abstract_state, iterator, check):
    """(state, None), or (None, the first line of why `step` cannot be read). The
    processes agree, so that all of them fall back together."""
    state, reason = None, None
    _drop_abandoned_reads(str(absolute(self.directory)))
    try:
      record = self.record(step)
      saved = ocp.StandardCheckpointHandler().metadata(
          absolute(self.directory / str(step) / "state")).tree
    except Exception as e:  # pylint: disable=broad-except  # TensorStore, Orbax, OS, JSON
      reason = _why(e)
    else:
      check(record)
      _check_same_state(saved, abstract_state, self.directory / str(step))
      try:
        state = self.restore(step, abstract_state, iterator)
      except Exception as e:  # pylint: disable=broad-except
        reason = _why(e)
    if jax.process_count() > 1:  # every process takes part, failed or not
      failed = multihost_utils.process_allgather(np.asarray(reason is not None))
      if failed.any() and reason is None:
        state, reason = None, "another process could not read it"
    return state, reason

  def _move_aside(self, step: int) -> epath.Path:
    target = self.directory.parent / UNREADABLE / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      suffix = 1
      while target.exists():
        target, suffix = target.parent / f"{step}.{suffix}", suffix + 1
      (self.directory / str(step)).rename(target)
    multihost_utils.sync_global_devices(f"moved checkpoint {step} aside")
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_same_state(saved, abstract_state, where: epath.Path) -> None:
  """Refuses a checkpoint whose train state (its metadata tree `saved`) holds other arrays
  than this run's: restoring it would fail, and the checkpoint is not unreadable (a
  DCD student's state holds its teacher; a --mode=train run's does not)."""
  paths = [set(ocp.tree.to_flat_dict(tree)) for tree in (saved, abstract_state)]
  if paths[0] != paths[1]:
    only = ["/".join(min(a - b)) if a - b else "none" for a, b in
            ((paths[0], paths[1]), (paths[1], paths[0]))]
    raise UsageError(f"checkpoint {where} holds a train state with other arrays than this "
                     f"run's ({len(paths[0] - paths[1])} only there, e.g. {only[0]}; "
                     f"{len(paths[1] - paths[0])} only in this run, e.g. {only[1]}): "
                     "resume it with its own --mode and config, or use a new --workdir.")


ABANDONED_READ = "_read_array_index_and_device_put"  # Orbax's coroutine reading one array


def _abandoned(error: BaseException) -> bool:
  """Whether `error` was raised in a read that Orbax left behind, or by such a read ending
  into Orbax's closed event loop."""
  frames = {frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)}
  return ABANDONED_READ in frames or (
      isinstance(error, RuntimeError) and "call_soon_threadsafe" in frames
      and str(error) == "Event loop is closed")


class _AbandonedReads(logging_std.Filter):
  """Drops asyncio's "exception was never retrieved" for the reads of `directory`."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and "exception was never retrieved" in record.getMessage()
                and (_abandoned(error) or self.directory in str(error)))


@functools.cache
def _drop_abandoned_reads(directory: str) -> None:
  """Orbax raises at the first array of a checkpoint that it cannot read, leaves the other
  reads running and closes their event loop: as they end and are collected, Python and
  asyncio print each one's traceback (a thousand lines for a small model, around the one
  line that says what happened, some of them as Orbax raises). From the first restore from
  `directory` on, those, and only those, are dropped; any other exception is printed as
  before."""
  warnings.filterwarnings("ignore", f"coroutine '{ABANDONED_READ}' was never awaited",
                          RuntimeWarning)
  logging_std.getLogger("asyncio").addFilter(_AbandonedReads(directory))
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_reads", False):
    return

  def hook(unraisable):
    if unraisable.exc_value is None or not _abandoned(unraisable.exc_value):
      previous(unraisable)
  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook


def _why(error: BaseException) -> str:
  """The first line of the innermost cause of `error`, at most 300 characters: the storage
  layer's own words (TensorStore's "OUT_OF_RANGE: Error reading ... in OCDBT database at
  local file ...", say) rather than Orbax's wrapper, which quotes the array's whole spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  return str(error).strip().split("\n")[0][:300]


def export(directory: epath.Path, params, record: dict) -> None:
  """Weights only (params, e.g. the EMA) and the run record, in DIRECTORY/{params,
  record.json}; what `--mode=sample` and distillation load.

  An export already there is replaced only once the new weights are on disk: they are
  written to params.partial, then the old params are renamed to params.previous, the new
  ones to params, the record is replaced and params.previous deleted. A run killed while
  saving leaves the previous export as it was; killed between those renames, the folder
  holds params.previous, which `_locate` refuses with what to do."""
  directory = absolute(epath.Path(directory))
  partial, previous, final = (directory / name for name in (
      "params.partial", "params.previous", "params"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(partial, params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    if previous.exists():  # left by an export killed after it wrote params and the record
      previous.rmtree()
    if final.exists():
      final.rename(previous)
    partial.rename(final)
    outputs.write_json(directory / "record.json", record)
    if previous.exists():
      previous.rmtree()
  multihost_utils.sync_global_devices(f"exported to {directory}")


def _locate(directory: epath.Path) -> tuple[str, epath.Path, int | None]:
  """A workdir's latest checkpoint, else an export (the folder itself, or WORKDIR/export):
  a distillation resumed past its export (and stopped before exporting again) is read at
  its newer steps."""
  if not directory.exists():
    raise UsageError(f"{directory} does not exist: point it at a training or distillation "
                     "workdir, or an export.")
  if (directory / "checkpoints").is_dir():
    step = Checkpoints(directory / "checkpoints").latest_step()
    if step is not None:
      return "checkpoint", directory / "checkpoints", step
  for folder in (directory, directory / "export"):
    if (folder / "params.previous").is_dir():
      raise UsageError(
          f"{folder} was being replaced by a new export when its run stopped: rerun that "
          f"run (distillation or convert), or, to keep the previous export, delete "
          f"{folder / 'params'} if present and rename {folder / 'params.previous'} to "
          "params (its record.json may already be the new one's).")
    if (folder / "params").is_dir() and (folder / "record.json").is_file():
      return "export", folder, None
  inside = [str(directory / name) for name in ("teacher", "student")
            if (directory / name).is_dir()]
  if (directory / "model.safetensors").is_file():
    hint = " (it holds reference-layout weights: import them with python -m flmjax.convert)"
  elif inside:
    hint = f" (a pipeline's workdir: use {' or '.join(inside)})"
  else:
    hint = ""
  raise UsageError(f"{directory} holds no flmjax checkpoint (checkpoints/STEP) or export "
                   "(params + record.json); point it at a training or distillation "
                   f"workdir{hint}.")


def latest_step(directory: str | epath.Path) -> int | None:
  """The step of the weights `directory` holds (None for an export)."""
  return _locate(epath.Path(directory).expanduser())[2]


def _at_step(directory, step):
  kind, folder, latest = _locate(epath.Path(directory).expanduser())
  if kind == "checkpoint" and step is not None and step != latest:
    if not (folder / str(step)).is_dir():
      raise UsageError(f"{folder} no longer holds step {step} (this run started from it); "
                       "restore it, or start the run again in a new workdir.")
    latest = step
  return kind, folder, latest


def _unreadable(kind: str, folder: epath.Path, step: int | None, error: Exception):
  """The UsageError for weights that cannot be read, naming them and what to do."""
  if kind == "export":
    where, advice = folder, ("write the export again (its distillation, or python -m "
                             "flmjax.convert), or point at the run's workdir")
  else:
    where, advice = folder / str(step), (
        "resume its run (--mode=train or distill), which moves an unreadable newest "
        "checkpoint aside and continues from the one before, or restore it from a copy")
  return UsageError(f"{where} cannot be read ({_why(error)}); {advice}.")


def read_record(directory: str | epath.Path, step: int | None = None) -> dict:
  """The run record of the weights in `directory` (a workdir or an export), at its latest
  checkpoint or at `step`."""
  kind, folder, step = _at_step(directory, step)
  try:
    record = (json.loads((folder / "record.json").read_text()) if kind == "export"
              else Checkpoints(folder).record(step))
  except Exception as e:  # pylint: disable=broad-except  # Orbax, TensorStore, OS, JSON
    raise _unreadable(kind, folder, step, e) from None
  if not isinstance(record, dict):
    raise _unreadable(kind, folder, step, ValueError("its run record is not a JSON object"))
  return record


def load_ema(directory: str | epath.Path, abstract_params, step: int | None = None):
  """The EMA weights in `directory` (an export, or a workdir's latest checkpoint or
  `step`), placed as the ShapeDtypeStructs of `abstract_params` say."""
  kind, folder, step = _at_step(directory, step)
  _drop_abandoned_reads(str(absolute(folder)))
  try:
    if kind == "export":
      return ocp.StandardCheckpointer().restore(absolute(folder / "params"), abstract_params)
    target = {"ema": abstract_params}
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    return Checkpoints(folder).manager.restore(
        step, args=ocp.args.Composite(state=restore))["state"]["ema"]
  except Exception as e:  # pylint: disable=broad-except  # Orbax, TensorStore, OS
    raise _unreadable(kind, folder, step, e) from None
