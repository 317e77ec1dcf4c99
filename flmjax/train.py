"""The one training loop, and the two modes that run it: `train` (the FLM teacher, or the
discrete baseline of config.family) and `distill` (an FMLM student from a frozen teacher).

`fit` trains a `Task` from WORKDIR's newest readable checkpoint to train.steps: one
compiled step (flmjax/state.py), then the hooks of flmjax/hooks.py (progress, checkpoints,
validation, samples, stop requests). What is trained comes from an objective of the
registry (flmjax/registry.py); the loop does not branch on it.
"""

import copy
import dataclasses
from typing import Any, Callable, NamedTuple

from etils import epath
import jax
import ml_collections

from flmjax import checkpoint, distill as fmlm, hooks, outputs, registry, sharding
from flmjax import state as train_state
from flmjax.data import pipeline
from flmjax.errors import Stopped, UsageError
from flmjax.models import dit
from flmjax.objectives import Objective


@dataclasses.dataclass
class Task:
  """What a run trains: the run kind of its checkpoints, the model `build()` makes, the
  training loss, validation losses by metric prefix, samplers run on the EMA weights,
  and optionally frozen arrays (a teacher), initial params and more run record."""
  kind: str
  build: Callable
  objective: train_state.ObjectiveFn
  validation: dict
  samplers: dict
  frozen: Any = None
  initial_params: Callable | None = None  # layout -> params; default: build() fresh
  record: dict = dataclasses.field(default_factory=dict)
  teacher_every: int = 0  # the state's own teacher: the params every this many steps


def _start(config, path: epath.Path, prepared, task: Task):
  """The layout, the state (restored, or fresh), the checkpoints, the batches and the run
  record of a run."""
  cfg = config.train
  layout = train_state.plan(config, task.build, sharding.make_mesh(config.mesh),
                            teacher_every=task.teacher_every)
  record = dict(checkpoint.run_record(config, prepared.tokenizer, task.kind,
                                      prepared.path.name), **task.record)
  checkpoints = checkpoint.Checkpoints(path / "checkpoints", cfg.keep_checkpoints,
                                       cfg.keep_period)
  batches = iter(pipeline.train_batches(prepared, config.batch_size, config.seed))

  def check(saved):
    checkpoint.check_compatible(
        saved, kind=record["kind"], vocab_size=record["vocab_size"],
        model=record["config"]["model"], where=str(path / "checkpoints"),
        advice="use a new --workdir, or run with the checkpoint's config",
        tokenizer=record["tokenizer"]["fingerprint"])
    checkpoint.check_same_data_order(saved, record, str(path / "checkpoints"))
    checkpoint.check_kept(saved, cfg.keep_period, checkpoints.manager.all_steps(),
                          str(path / "checkpoints"))

  restored = checkpoints.restore_latest(layout.abstract_state, batches, check)
  if restored is None:
    initial = task.initial_params or (lambda layout: train_state.random_params(
        layout, task.build))
    state = train_state.init_state(layout, initial(layout), config.seed)
  else:
    state = restored[1]
    outputs.say(f"resumed from {path / 'checkpoints'} at step {restored[0]}")
  if jax.process_index() == 0:
    outputs.write_json(path / "config.json", record)
  return layout, state, checkpoints, batches, record


class Result(NamedTuple):
  layout: train_state.Layout
  state: dict  # the final train state
  record: dict  # the run record saved with its checkpoints


def fit(config: ml_collections.ConfigDict, path: epath.Path, prepared: pipeline.Prepared,
        task: Task) -> Result:
  """Trains `task` to config.train.steps."""
  cfg = config.train
  layout, state, checkpoints, batches, record = _start(config, path, prepared, task)
  step = int(state["step"])
  step_fn = (train_state.compile_step(layout, task.objective, config, task.frozen)
             if step < cfg.steps else None)
  log, guard = outputs.MetricsLog(path, step), hooks.FiniteGuard()
  saving = hooks.Checkpointing(checkpoints, batches, record, guard, cfg.checkpoint_every,
                               checkpoints.latest_step())
  validation = {prefix: hooks.validation_loss(fn, layout.graphdef, prepared, config,
                                              layout.mesh, task.frozen)
                for prefix, fn in task.validation.items()}
  held_out = prepared.meta["splits"]["valid"]["examples"]
  if cfg.eval_every and held_out < config.batch_size:
    outputs.say(f"no validation: the validation split of {prepared.path} has {held_out} "
                f"examples, fewer than one batch ({config.batch_size}); hold out more text "
                "(data.valid_fraction, or more files: a dir corpus splits by file and "
                ".jsonl line) or set train.eval_every=0 to say so.")
  progress = hooks.Progress(log, guard, path / "checkpoints", cfg.log_every, cfg.steps,
                            config.batch_size * config.data.seq_len)
  # saved before validating and sampling: a failure there loses no training
  after = [progress, saving, hooks.Validation(validation, log, cfg.eval_every),
           hooks.Samples(path / "samples", task.samplers, layout.graphdef,
                         prepared.tokenizer, config.seed, cfg.sample_every)]
  stop, stopped = hooks.StopRequest(), False
  batch_sharding = sharding.batch_sharding(layout.mesh)
  try:
    while step < cfg.steps:
      progress.before_step()
      state, metrics = step_fn(state, pipeline.to_global(next(batches), batch_sharding),
                               task.frozen)
      step += 1
      guard.update(metrics.pop("nonfinite_step"))
      last = step == cfg.steps
      end = hooks.StepEnd(step, state, metrics, last, stop.agreed())
      for hook in after:
        hook.after_step(end)
      if end.stopping:  # also in the last step: a pipeline's next stage does not start
        stopped = True
        break
  except KeyboardInterrupt:  # a second Ctrl-C, or one with several processes
    # Several processes may each be at another step; only SIGTERM makes them agree.
    if jax.process_count() > 1:
      outputs.say(f"interrupted; {guard.kept(path / 'checkpoints')}")
      raise
    try:
      # Interrupted after a batch was taken but before its step (or before the step was
      # counted), the state still says which step it holds: the data go back to it.
      step = int(state["step"])
      batches.set_state({"next_index": step})
      if step not in checkpoints.manager.all_steps():  # (a stop's save, interrupted)
        saving.save(step, state)
      outputs.say(f"interrupted: saved step {step} to {path / 'checkpoints'}")
    except RuntimeError:  # interrupted mid-step: the donated state is gone
      outputs.say(f"interrupted mid-step; {guard.kept(path / 'checkpoints')}")
    raise
  finally:
    stop.restore()
    checkpoints.close()
  if stopped or stop.requested is not None:  # on request (also during the last hooks), saved
    if stop.interrupted:
      outputs.say(f"interrupted: saved step {step} to {path / 'checkpoints'}")
      raise KeyboardInterrupt
    outputs.say(f"SIGTERM: saved step {step} to {path / 'checkpoints'}; stopping")
    raise Stopped(step)
  return Result(layout, state, record)


def _data_settings(config) -> dict:
  """The settings of a config (or a run record's) that make other prepared data, by name."""
  data, tokenizer = config["data"], config["tokenizer"]
  names = ["data.seq_len", "data.corpus", "data.max_documents", "tokenizer.kind"]
  if data["corpus"] in ("embedded", "dir"):
    names.append("data.valid_fraction")
  if data["corpus"] == "dir":
    names.append("data.text_field")
  if tokenizer["kind"] == "sentencepiece" and not tokenizer.get("path"):  # trained here
    names.append("tokenizer.vocab_size")
  sections = [name.split(".") for name in names]
  return {f"{section}.{field}": config[section][field] for section, field in sections
          if field in config[section]}  # (older run records lack some)


def _check_same_run(config: ml_collections.ConfigDict, objective: Objective,
                    folder: epath.Path) -> None:
  """Refuses, before anything is prepared, to resume the run in `folder` as another kind
  or architecture (checkpoint.check_compatible, the vocabulary and tokenizer left to the
  check after preparing), or with another L, corpus, corpus split, tokenizer kind or
  trained vocabulary size, each of which makes other prepared data (hours of tokenizing for
  OpenWebText); checkpoint.check_same_data_order checks the prepared data themselves once
  they are there (a moved corpus or tokenizer file may give the same)."""
  saved = checkpoint.Checkpoints(folder).newest_record() if folder.exists() else None
  if saved is None:
    return
  checkpoint.check_compatible(
      saved, kind=objective.kind, vocab_size=None,
      model=registry.with_family(config, objective).model.to_dict(), where=str(folder),
      advice="use a new --workdir, or run with the checkpoint's config")
  before, now = _data_settings(saved["config"]), _data_settings(config)
  diffs = [f"{name} {before[name]!r} != {now[name]!r}" for name in now
           if name in before and before[name] != now[name]]
  if diffs:
    raise UsageError(f"{folder} holds a run with other data ({'; '.join(diffs)}; saved != "
                     "now); use the run's data settings, or a new --workdir.")


def _with_data_dir(config: ml_collections.ConfigDict, workdir: str,
                   teacher_record: dict | None) -> ml_collections.ConfigDict:
  """A copy of `config` whose data.dir is the absolute path of the prepared data, so that
  the run records name them wherever a later command runs (eval and sample of an export
  read them there): data.dir if given; for a student without one, its teacher's prepared
  data where this host has them (the teacher run's data.dir, else TEACHER/data), not
  tokenized again; else WORKDIR/data."""
  config = copy.deepcopy(config)
  if not config.data.dir and teacher_record is not None:
    config.data.dir = pipeline.run_data_dir(config, teacher_record, config.teacher_checkpoint)
    if config.data.dir:
      outputs.say(f"reading the teacher's prepared data in {config.data.dir}")
  config.data.dir = str(pipeline.data_dir(config, workdir).absolute())
  return config


def run(config: ml_collections.ConfigDict, workdir: str, objective: Objective) -> Result:
  """Prepares the data and trains `objective`'s model in WORKDIR (from a teacher when the
  objective takes one): samples at train.sample_steps (teacher, baselines) or 1, 2 and 4
  steps (student), validation of the data's loss (FLM's denoising loss for FLM and FMLM,
  the baseline's own NLL or bound) and, with a frozen teacher, of the objective itself.
  A student of its own teacher (Duo's DCD) starts as the teacher's EMA weights."""
  outputs.say(f"{'distill' if objective.teacher else 'train'} {objective.kind}"
              f"{f' ({objective.name})' if objective.name != objective.kind else ''} in "
              f"{workdir}")
  # the teacher is checked before anything is written
  teacher_step, teacher_record = (
      fmlm.check_teacher(registry.with_family(config, objective),
                         epath.Path(workdir).expanduser(), objective.teacher,
                         objective.self_teacher)
      if objective.teacher else (None, None))
  _check_same_run(config, objective, epath.Path(workdir).expanduser() / "checkpoints")
  config = _with_data_dir(config, workdir, teacher_record)
  path = outputs.create_workdir(workdir)
  prepared = pipeline.prepare(config, workdir)
  config = registry.with_family(config, objective, prepared.tokenizer)
  vocab_size = prepared.tokenizer.vocab_size
  build = dit.builder(config.model, vocab_size, config.seed)
  steps = (1, 2, 4) if objective.teacher else (config.train.sample_steps,)
  samplers = dict(registry.sampler(
      objective.kind, config, n, config.train.num_samples, seq_len=config.data.seq_len,
      mask_id=config.model.mask_id, bos_id=prepared.tokenizer.bos_id) for n in steps)
  data_loss = objective.teacher or objective.name
  validation = {"": registry.OBJECTIVES[data_loss].build(config, vocab_size, train=False)}
  if not objective.teacher:
    return fit(config, path, prepared, Task(objective.kind, build, objective.build(
        config, vocab_size), validation, samplers))
  if objective.self_teacher:  # loaded only to start from, not when resuming
    def initial(layout):
      return fmlm.load_teacher(config, teacher_step, teacher_record, prepared.tokenizer,
                               layout.mesh).params
    return fit(config, path, prepared, Task(
        objective.kind, build, objective.build(config, vocab_size), validation, samplers,
        initial_params=initial, record=fmlm.teacher_source(config, teacher_step),
        teacher_every=config.distill.dcd.round_steps))
  cfg = config.distill
  counts = fmlm.split_counts(config.batch_size, cfg.diagonal_fraction,
                             cfg.boundary_fraction if objective.boundary_rows else 0.0)
  outputs.say(f"each batch of {config.batch_size}: {counts[0]} diagonal, {counts[1]} "
              f"boundary and {counts[2]} off-diagonal rows")
  teacher = fmlm.load_teacher(config, teacher_step, teacher_record, prepared.tokenizer,
                              sharding.make_mesh(config.mesh))
  validation["distill_"] = objective.build(config, vocab_size, teacher.graphdef, train=False)
  return fit(config, path, prepared, Task(
      objective.kind, build, objective.build(config, vocab_size, teacher.graphdef),
      validation, samplers, frozen=teacher.params, record=teacher.record,
      initial_params=lambda layout: dict(train_state.random_params(layout, build), **{
          k: v for k, v in teacher.params.items() if k != "loss_weighting"})))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=train`: the model of config.family (flm: the FLM teacher); the final train
  state."""
  return run(config, workdir, registry.OBJECTIVES[config.family]).state


def distill(config: ml_collections.ConfigDict, workdir: str) -> Result:
  """`--mode=distill`: the student of config.teacher_checkpoint by distill.objective (the
  FMLM student of an FLM, or Duo's DCD), with distill.* in place of train.*
  (distill.student_config); then its EMA weights are exported to WORKDIR/export."""
  config = fmlm.student_config(config)
  result = run(config, workdir, registry.OBJECTIVES[config.distill.objective])
  export = epath.Path(workdir).expanduser() / "export"
  checkpoint.export(export, result.state["ema"], result.record)
  outputs.say(f"exported the student's EMA weights to {export}")
  return result
