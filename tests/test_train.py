"""The training loop: exact resume (also after SIGKILL and from an unreadable latest
checkpoint), the non-finite stop, refused checkpoints and workdirs."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import train_config
from flmjax import checkpoint, evaluate, hooks, objectives, outputs, train
from flmjax import state as train_state
from flmjax.data import pipeline
from flmjax.errors import Stopped, UsageError
from flmjax.models import dit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _final_params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _assert_same_params(a, b):
  for x, y in zip(_final_params(a), _final_params(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path, prepared, monkeypatch, capsys):
  """Also after Ctrl-C between taking a batch and its step: the data go back to the step
  the saved state holds."""
  def config(**train):
    config = train_config(**train)
    config.data.dir = str(prepared.path.parent)
    return config
  straight = train.train(config(steps=5), str(tmp_path / "a"))
  placed, to_global = [], pipeline.to_global

  def interrupted_at_the_fourth(*args):
    placed.append(1)
    if len(placed) == 4:
      raise KeyboardInterrupt
    return to_global(*args)
  with monkeypatch.context() as patch:
    patch.setattr(pipeline, "to_global", interrupted_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
      train.train(config(steps=5, checkpoint_every=0, keep_period=3), str(tmp_path / "b"))
  assert "interrupted: saved step 3 to" in capsys.readouterr().out
  data = json.loads((tmp_path / "b/checkpoints/3/data/process_0-of-1.json").read_text())
  assert data == {"next_index": 3}
  # Orbax would delete step 3, kept for good by the run, at the resumed run's next save.
  for period in (0, 2):
    with pytest.raises(UsageError, match=rf"holds checkpoints \[3\], which its run keeps for "
                       rf"good \(train.keep_period=3\); with train.keep_period={period}"):
      train.train(config(steps=5, keep_checkpoints=1, keep_period=period), str(tmp_path / "b"))
  resumed = train.train(config(steps=5, keep_checkpoints=1, keep_period=3), str(tmp_path / "b"))
  assert checkpoint.Checkpoints(tmp_path / "b/checkpoints").manager.all_steps() == [3, 5]
  _assert_same_params(straight, resumed)
  data = json.loads((tmp_path / "b/checkpoints/5/data/process_0-of-1.json").read_text())
  assert data == {"next_index": 5}  # the Grain iterator position: one batch per step
  lines = [json.loads(l) for l in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_and_a_second_one_at_once(tmp_path, prepared,
                                                              monkeypatch, capsys):
  """Ctrl-C (SIGINT) saves the step it arrives in, whose state the step donated; a second
  Ctrl-C interrupts at once, and the data go back to the saved state's step. SIGTERM during
  the last step saves it and stops: a pipeline's next stage does not start."""
  config = train_config(steps=4, checkpoint_every=0, keep_checkpoints=5)
  config.data.dir = str(prepared.path.parent)
  to_global = pipeline.to_global

  def run(signals, at):  # sent as the run places its `at`-th batch
    placed = []

    def signalled(*args):
      placed.append(1)
      if len(placed) == at:
        for signum in signals:
          os.kill(os.getpid(), signum)
      return to_global(*args)
    with monkeypatch.context() as patch:
      patch.setattr(pipeline, "to_global", signalled)
      return train.train(config, str(tmp_path))

  def saved():
    return checkpoint.Checkpoints(tmp_path / "checkpoints").manager.all_steps()

  def position(step):
    return json.loads((tmp_path / f"checkpoints/{step}/data/process_0-of-1.json").read_text())

  before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a job started in the background
  with pytest.raises(KeyboardInterrupt):
    run([signal.SIGINT], at=2)  # in step 2
  assert "interrupted: saved step 2 to" in capsys.readouterr().out
  assert saved() == [2] and position(2) == {"next_index": 2}
  assert signal.getsignal(signal.SIGINT) is before
  with pytest.raises(KeyboardInterrupt):
    run([signal.SIGINT, signal.SIGINT], at=2)  # before step 4, the resumed run's second
  assert "interrupted: saved step 3 to" in capsys.readouterr().out
  assert saved() == [2, 3] and position(3) == {"next_index": 3}
  with pytest.raises(Stopped):  # in step 4, the last: saved, and a pipeline stops there
    run([signal.SIGTERM], at=1)
  assert saved() == [2, 3, 4]


def test_a_ctrl_c_after_any_stop_request_stops_at_once_and_sigterm_says_unfinished():
  before = signal.getsignal(signal.SIGINT)
  stop = hooks.StopRequest()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
    stop.requested = None
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's notice after Ctrl-C: exit 143
    assert stop.agreed() and not stop.interrupted
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_a_validation_split_under_one_batch_is_said(tmp_path, capsys, prepared):
  """The suite's data hold 64 validation examples: batches of 128 give no validation,
  which the run says at its start rather than logging nothing."""
  config = train_config(steps=1, eval_every=1)
  config.batch_size, config.data.dir = 128, str(prepared.path.parent)
  train.train(config, str(tmp_path))
  assert "has 64 examples, fewer than one batch (128)" in capsys.readouterr().out
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines and not any("valid_loss" in l for l in lines)


def test_a_folder_without_weights_says_where_they_may_be(tmp_path):
  (tmp_path / "teacher").mkdir()
  (tmp_path / "student").mkdir()
  with pytest.raises(UsageError, match=r"a pipeline's workdir: use \S+/teacher or \S+/student"):
    checkpoint.read_record(tmp_path)
  (tmp_path / "reference").mkdir()
  (tmp_path / "reference" / "model.safetensors").write_bytes(b"")
  with pytest.raises(UsageError, match="reference-layout weights: import them"):
    checkpoint.read_record(tmp_path / "reference")


@pytest.mark.slow
def test_a_workdir_is_read_at_its_latest_checkpoint_before_its_export(tmp_path, teacher):
  """A run resumed past its export and stopped: its workdir gives the checkpoint's EMA, the
  export folder its own weights; without checkpoints the workdir gives the export."""
  config = train_config()
  ema = evaluate.load(config, teacher)[2]
  workdir = tmp_path / "run"
  shutil.copytree(teacher, workdir)
  stale = jax.tree.map(jnp.zeros_like, ema)
  checkpoint.export(epath.Path(workdir) / "export", stale, checkpoint.read_record(teacher))
  assert checkpoint.latest_step(workdir) == checkpoint.latest_step(teacher) == 2
  for directory, expected in ((workdir, ema), (workdir / "export", stale)):
    for got, want in zip(*(jax.tree.leaves(p) for p in (
        evaluate.load(config, str(directory))[2], expected))):
      np.testing.assert_array_equal(got, want)
  shutil.rmtree(workdir / "checkpoints")
  assert checkpoint.latest_step(workdir) is None
  assert not any(leaf.any() for leaf in jax.tree.leaves(evaluate.load(config, str(workdir))[2]))


def test_an_export_is_replaced_only_once_the_new_one_is_written(tmp_path, monkeypatch):
  """A run killed while exporting (as every distillation rerun does) leaves the previous
  export readable; killed between the renames that swap it in, the folder is refused with
  what to do, not read with a mismatched record."""
  old, new = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), old)
  checkpoint.export(tmp_path, old, {"step": 1})

  def killed(self, path, *args, **kwargs):  # deletes what is there, writes part, dies
    shutil.rmtree(path, ignore_errors=True)
    pathlib.Path(path).mkdir()
    (pathlib.Path(path) / "part").write_text("")
    raise KeyboardInterrupt
  with monkeypatch.context() as patch:
    patch.setattr(ocp.StandardCheckpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
      checkpoint.export(tmp_path, new, {"step": 2})
  assert checkpoint.read_record(tmp_path) == {"step": 1}
  np.testing.assert_array_equal(checkpoint.load_ema(tmp_path, abstract)["w"], np.zeros(3))
  checkpoint.export(tmp_path, new, {"step": 2})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["params", "record.json"]
  assert checkpoint.read_record(tmp_path) == {"step": 2}
  np.testing.assert_array_equal(checkpoint.load_ema(tmp_path, abstract)["w"], np.ones(3))
  (tmp_path / "params").rename(tmp_path / "params.previous")
  with pytest.raises(UsageError, match="was being replaced by a new export when its run "
                     "stopped: rerun that run"):
    checkpoint.read_record(tmp_path)


def _truncate_largest_file(directory: pathlib.Path) -> None:
  largest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 3)


def test_unreadable_exports_are_refused_by_name_with_what_to_do(tmp_path):
  """An export whose weights or record cannot be read (as sample, eval, generate, a
  distillation's teacher and convert read them) is one UsageError naming it, not a
  traceback of Orbax's or of json's."""
  params = {"w": jnp.arange(4096.0)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  checkpoint.export(tmp_path, params, {"kind": "flm"})
  _truncate_largest_file(tmp_path / "params")
  with pytest.raises(UsageError, match=f"{tmp_path} cannot be read .*; write the export again"):
    checkpoint.load_ema(tmp_path, abstract)
  for text, why in (('{"kind": "fmlm"', "Expecting"), ("[1, 2]", "its run record is not a JSON object")):
    (tmp_path / "record.json").write_text(text)
    with pytest.raises(UsageError, match=f"{tmp_path} cannot be read \\({why}"):
      checkpoint.read_record(tmp_path)


@pytest.mark.slow
def test_an_unreadable_latest_checkpoint_is_moved_aside_and_the_one_before_resumed(
    tmp_path, capsys, prepared):
  config = train_config(steps=6, checkpoint_every=2)
  config.data.dir = str(prepared.path.parent)
  straight = train.train(config, str(tmp_path / "straight"))
  train.train(config, str(tmp_path / "run"))
  _truncate_largest_file(tmp_path / "run/checkpoints/6/state")
  kept = sorted(p.stat().st_size for p in (tmp_path / "run/checkpoints/6").rglob("*")
                if p.is_file())
  capsys.readouterr()
  resumed = train.train(config, str(tmp_path / "run"))
  _assert_same_params(straight, resumed)  # resumed exactly from step 4
  moved = tmp_path / "run/unreadable_checkpoints/6"
  assert sorted(p.stat().st_size for p in moved.rglob("*") if p.is_file()) == kept
  assert (tmp_path / "run/checkpoints/6").is_dir()  # saved again by the resumed run
  reported = [l for l in capsys.readouterr().out.splitlines() if "cannot be read" in l]
  assert len(reported) == 1 and str(tmp_path / "run/checkpoints/6") in reported[0]
  # the storage's own words (the file and byte range), not Orbax's wrapper and array spec
  assert "OCDBT database at local file" in reported[0] and "TensorStore({" not in reported[0]
  for step in (4, 6):  # two unreadable in a row: refused; one moved aside, nothing deleted
    _truncate_largest_file(tmp_path / f"run/checkpoints/{step}/state")
  with pytest.raises(UsageError, match="checkpoints/4 cannot be read either"):
    train.train(config, str(tmp_path / "run"))
  assert sorted(p.name for p in (tmp_path / "run/unreadable_checkpoints").iterdir()) == [
      "6", "6.1"]
  assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["2", "4"]


def _command_line(workdir, steps: int, data_dir) -> list[str]:
  """The command line of train_config(steps) in float32 on the corpus in `data_dir`."""
  return [sys.executable, "-m", "flmjax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--mode=train", "--config.data.max_documents=400",
          "--config.tokenizer.vocab_size=512", "--config.data.seq_len=32",
          "--config.batch_size=8", "--config.model.width=32", "--config.model.depth=1",
          "--config.model.heads=2", "--config.model.cond_width=16",
          "--config.model.dtype=float32", "--config.train.warmup_steps=2",
          "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.sample_every=0", "--config.train.checkpoint_every=2",
          f"--config.train.steps={steps}", f"--config.data.dir={data_dir}"]


@pytest.mark.slow
def test_unreadable_checkpoints_are_said_without_orbaxs_tracebacks(tmp_path, prepared):
  """Orbax raises at the first array it cannot read and leaves the checkpoint's other
  reads in an event loop that it closes; Python and asyncio would print hundreds of
  tracebacks of them around flmjax's lines. The command line prints its lines alone."""
  config = train_config(steps=4, checkpoint_every=2)
  config.model.dtype = "float32"
  config.data.dir = str(prepared.path.parent)
  train.train(config, str(tmp_path))
  for data in (tmp_path / "checkpoints").glob("*/state/ocdbt.process_*/d/*"):
    os.truncate(data, data.stat().st_size // 3)  # every data file cut short: many reads fail
  # the command (its sys.argv: flmjax.main and the flags), then, as the process ends, a
  # second for the reads to end and garbage collections
  [_, _, *args] = _command_line(tmp_path, 4, prepared.path.parent)

  def main(args):
    run = subprocess.run(
        [sys.executable, "-c", "import atexit, gc, runpy, sys, time; atexit.register(lambda: "
         "[time.sleep(0.2) or gc.collect() for _ in range(5)]); sys.argv = sys.argv[1:]; "
         "runpy.run_module('flmjax.main', run_name='__main__')", *args],
        cwd=ROOT, capture_output=True, text=True, check=False)
    for trace in ("Traceback", "Exception ignored", "never retrieved", "never awaited"):
      assert trace not in run.stderr, run.stderr[-3000:]
    return run
  run = main(args)
  assert run.returncode == 2 and "checkpoints/2 cannot be read either" in run.stderr, (
      run.stderr[-3000:])
  assert run.stdout.count("checkpoints/4 cannot be read (") == 1, run.stdout
  # sampling it (as eval, generate and a distillation's teacher read it too)
  run = main([arg.replace("--mode=train", "--mode=sample").replace(
      f"--workdir={tmp_path}", f"--workdir={tmp_path / 'samples'}") for arg in args]
             + [f"--config.checkpoint={tmp_path}"])
  assert run.returncode == 2 and "checkpoints/2 cannot be read (" in run.stderr and (
      "resume its run" in run.stderr), run.stderr[-3000:]


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, prepared):
  """SIGKILL during training (no chance to save), then the same run again (in this
  process): it resumes, and its parameters equal an uninterrupted run's."""
  process = subprocess.Popen(_command_line(tmp_path / "run", 8, prepared.path.parent),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and any(json.loads(l)["step"] >= 5 for l in
                                metrics.read_text().splitlines()):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  config = train_config(steps=8)  # what the command line above builds
  config.model.dtype = "float32"
  config.data.dir = str(prepared.path.parent)
  resumed = train.train(config, str(tmp_path / "run"))
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()
           if "loss" in json.loads(l)]
  assert steps == list(range(1, 9))  # resumed, not started again; step 5 logged once
  straight = train.train(config, str(tmp_path / "straight"))
  for name in ("params", "ema"):
    for a, b in zip(jax.tree.leaves(resumed[name]), jax.tree.leaves(straight[name])):
      np.testing.assert_array_equal(a, b)


@jax.custom_vjp
def _infinite_gradient(x, poisoned):
  """x, with an infinite gradient where `poisoned`."""
  return x


_infinite_gradient.defvjp(lambda x, poisoned: (x, poisoned),
                          lambda poisoned, g: (g * jnp.where(poisoned, jnp.inf, 1.0), None))


@pytest.mark.slow
@pytest.mark.parametrize("poisoned", ["loss", "gradient"])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, poisoned):
  """A NaN loss, or a finite loss with an infinite gradient (whose update makes the
  weights NaN), at step 3 stops the run before it saves anything after step 2."""
  config = train_config(steps=8, checkpoint_every=2)
  prepared = pipeline.prepare(config, str(tmp_path))
  vocab = prepared.tokenizer.vocab_size
  good = objectives.denoising(config, vocab)

  def objective(model, batch, rng, frozen, part=(0, 1)):
    loss, metrics = good(model, batch, rng, frozen, part)
    if poisoned == "gradient":
      loss = _infinite_gradient(loss, frozen["step"] == 2)
      return loss, dict(metrics, loss=loss)
    # The first update has learning rate 0 (warmup), the second moves the bias: NaN at 3.
    poison = jnp.where(model.output.bias[...][0] != 0, jnp.nan, 1.0)
    return loss * poison, dict(metrics, loss=loss * poison)

  task = train.Task("flm", dit.builder(config.model, vocab), objective, {}, {})
  with pytest.raises(FloatingPointError, match="NaN or inf at step 3.*last checkpoint is "
                                                "step 2"):
    train.fit(config, outputs.create_workdir(str(tmp_path)), prepared, task)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_progress_logs_window_means_and_the_last_steps_learning_rate(tmp_path):
  """During warmup the logged learning rate is the one of the window's last step (the
  rate at a step, not a mean of the rising ones); the loss is the window's mean."""
  lr = train_state.learning_rate(train_config(learning_rate=3e-4, warmup_steps=4).train)
  log = outputs.MetricsLog(epath.Path(tmp_path))
  progress = hooks.Progress(log, hooks.FiniteGuard(), tmp_path, 2, 4, 10)
  for step in range(1, 5):
    progress.before_step()
    metrics = {"loss": jnp.float32(step), "grad_norm": jnp.float32(1.0), "lr": lr(step - 1)}
    progress.after_step(hooks.StepEnd(step, {}, metrics, step == 4, False))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(l["step"], l["loss"]) for l in lines] == [(2, 1.5), (4, 3.5)]
  np.testing.assert_allclose([l["lr"] for l in lines], [0.75e-4, 2.25e-4], rtol=1e-6)


@pytest.mark.slow
def test_a_failure_in_sampling_keeps_the_checkpoint_of_its_step(tmp_path, prepared):
  """The step is saved before it is validated and sampled: a sampler that fails (out of
  memory, say) at a checkpoint step loses no training."""
  config = train_config(steps=4, checkpoint_every=2, sample_every=2)
  vocab = prepared.tokenizer.vocab_size

  def failing(graphdef, params, rng):
    raise MemoryError("sampler out of memory")

  task = train.Task("flm", dit.builder(config.model, vocab), objectives.denoising(
      config, vocab), {}, {"failing": failing})
  with pytest.raises(MemoryError, match="sampler out of memory"):
    train.fit(config, outputs.create_workdir(str(tmp_path)), prepared, task)
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]


@pytest.mark.slow
def test_checkpoint_of_another_architecture_or_data_order_is_refused(tmp_path):
  train.train(train_config(steps=2), str(tmp_path))
  (tokenizer_file,) = (tmp_path / "data" / "tokenizer").glob("*.model")
  config = train_config(steps=4)
  config.model.width = 48
  with pytest.raises(UsageError, match="model.width 32 != 48"):
    train.train(config, str(tmp_path))
  # Same V, other ids: the SentencePiece model of another corpus (fewer documents).
  other = train_config()
  other.data.max_documents = 300
  config.model.width = 32
  pipeline.prepare(other, str(tmp_path / "other"))
  (config.tokenizer.path,) = map(str, (tmp_path / "other/data/tokenizer").glob("*.model"))
  with pytest.raises(UsageError, match="another kind, vocabulary, tokenizer .*tokenizer "):
    train.train(config, str(tmp_path))
  # The same model on another data order: the saved position would index it.
  config = train_config(steps=4)
  config.batch_size, config.seed = 16, 5
  with pytest.raises(UsageError, match="another data order [(]batch_size 8 != 16; seed 1 != 5;"):
    train.train(config, str(tmp_path))
  # Refused before other data are prepared (or another tokenizer trained).
  prepared = sorted((tmp_path / "data").glob("prepared-*"))
  for field, value, message in (
      ("seq_len", 16, "data.seq_len 32 != 16"), ("max_documents", 300,
      "data.max_documents 400 != 300"), ("valid_fraction", 0.5, "data.valid_fraction 0.02 != 0.5"),
      ("vocab_size", 600, "tokenizer.vocab_size 512 != 600")):
    config = train_config(steps=4)
    config[{"vocab_size": "tokenizer"}.get(field, "data")][field] = value
    with pytest.raises(UsageError, match=rf"holds a run with other data \({message}; saved"):
      train.train(config, str(tmp_path))
  config = train_config(steps=4)
  config.model.width, config.data.max_documents = 48, 300  # another architecture, too
  with pytest.raises(UsageError, match="another kind, vocabulary, tokenizer or architecture "
                     r"\(model.width 32 != 48; saved"):
    train.train(config, str(tmp_path))
  assert sorted((tmp_path / "data").glob("prepared-*")) == prepared
  assert sorted(p.name for p in (tmp_path / "data" / "tokenizer").iterdir()) == [
      tokenizer_file.name]
  # Other prepared data (a corpus changed where it is), found once they are prepared
  saved = checkpoint.Checkpoints(tmp_path / "checkpoints").newest_record()
  with pytest.raises(UsageError, match="another data order [(]prepared data prepared-"):
    checkpoint.check_same_data_order(saved, dict(saved, data="prepared-0"), "here")
  assert not (tmp_path / "unreadable_checkpoints").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_unwritable_workdir(tmp_path):
  (tmp_path / "file").write_text("")
  for workdir in ("file/run", "file"):  # found with WORKDIR/data, the data directory
    with pytest.raises(UsageError, match=f"data directory {tmp_path}/{workdir}/data is inside "
                       f"{tmp_path}/file, which is a file; .* or --workdir to one"):
      train.train(train_config(), str(tmp_path / workdir))

