"""What the training loop does between steps, as separate small units.

After every step the loop hands each hook a `StepEnd`, in this order: `Progress` logs the
window's averages, `Checkpointing` saves by its policy, `Validation` logs the validation
losses of the EMA weights and `Samples` writes decoded samples; `FiniteGuard` stops the
run at the first non-finite loss and `StopRequest` turns SIGTERM (and Ctrl-C) into a step
at which every process stops.
"""

import dataclasses
import itertools
import signal
import time

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp

from flmjax import checkpoint, outputs, sharding
from flmjax.data import pipeline


@dataclasses.dataclass(frozen=True)
class StepEnd:
  """What hooks see after a step: its number, the new state and the step's metrics."""
  step: int
  state: dict
  metrics: dict
  last: bool  # step == train.steps
  stopping: bool  # a stop was requested; the loop ends after this step

  def due(self, every: int) -> bool:
    """Whether a hook run every `every` steps and at the end runs now; not at a stop,
    which saves and ends at once (a scheduler's notice gives little time)."""
    if self.stopping and not self.last:
      return False
    return self.last or bool(every and self.step % every == 0)


class FiniteGuard:
  """Keeps the first step whose loss or gradient norm was not finite on the device (no
  host sync per step); `check`, at log steps and before saving, stops the run naming it
  (a finite loss with an infinite gradient would make the weights NaN)."""

  def __init__(self):
    self.first_bad = None
    self.last_saved = None  # set by Checkpointing, for the message

  def update(self, nonfinite_step: jax.Array) -> None:
    self.first_bad = nonfinite_step if self.first_bad is None else jnp.where(
        self.first_bad > 0, self.first_bad, nonfinite_step)

  def kept(self, directory) -> str:
    """Which checkpoint the run leaves, in words."""
    return (f"the last checkpoint is step {self.last_saved} in {directory}"
            if self.last_saved is not None else "no checkpoint was written")

  def check(self, directory) -> None:
    if self.first_bad is not None and int(self.first_bad):
      raise FloatingPointError(
          f"the loss or the gradient became NaN or inf at step {int(self.first_bad)}; "
          f"stopping, {self.kept(directory)}.")


class Progress:
  """Every `every` steps, at the end and at a stop: the averages of the step metrics over
  the window (the learning rate: the last step's), s/step and tokens/s, to metrics.jsonl
  and a progress line. The window's clock runs from the first step after the last report
  (time in other hooks is not training time)."""

  def __init__(self, log: outputs.MetricsLog, guard: FiniteGuard, directory, every: int,
               total_steps: int, tokens_per_step: int):
    self.log, self.guard, self.directory = log, guard, directory
    self.every, self.total_steps, self.tokens_per_step = every, total_steps, tokens_per_step
    self.window, self.steps, self.start = None, 0, None

  def before_step(self) -> None:
    if self.start is None:
      self.start = time.perf_counter()

  def after_step(self, end: StepEnd) -> None:
    self.window = end.metrics if self.window is None else jax.tree.map(
        jnp.add, self.window, end.metrics)
    self.steps += 1
    if not (end.due(self.every) or end.stopping):
      return
    self.guard.check(self.directory)
    elapsed = time.perf_counter() - self.start
    window, lr = jax.device_get((self.window, end.metrics["lr"]))
    summary = {k: float(v) / self.steps for k, v in window.items()} | {"lr": float(lr)}
    summary.update(step_seconds=elapsed / self.steps,
                   tokens_per_second=self.tokens_per_step * self.steps / elapsed)
    self.log.write(end.step, summary)
    eta = (self.total_steps - end.step) * summary["step_seconds"]
    outputs.say(
        f"step {end.step}/{self.total_steps} | loss {summary['loss']:.5g} | grad "
        f"{summary['grad_norm']:.3g} | lr {summary['lr']:.2e} | "
        f"{summary['tokens_per_second']:,.0f} tokens/s | {summary['step_seconds']:.3f} "
        f"s/step | ETA {int(eta // 3600)}:{time.strftime('%M:%S', time.gmtime(eta))}")
    self.window, self.steps, self.start = None, 0, None


def validation_metrics(objective, graphdef, mesh):
  """The jitted (params, batch, key, frozen) -> `objective`'s metrics, traced under `mesh`
  as the train step is (models/dit.py splits attention over the batch's rows: a TPU kernel
  cannot be partitioned by XLA)."""

  @jax.jit
  def metrics(params, batch, key, frozen):
    with sharding.tracing_under(mesh):
      return objective(nnx.merge(graphdef, params), batch, key, frozen)[1]
  return metrics


def validation_loss(objective, graphdef, prepared, config, mesh, frozen=None):
  """A function params -> {metric: mean over the validation split} (at most
  config.train.eval_batches batches; None when the split has no full batch) of
  `objective` (built without dropout), with fixed draws so that values are comparable
  across a run."""
  batch_sharding = sharding.batch_sharding(mesh)
  rng = jax.random.PRNGKey(config.seed + 1)
  metrics = validation_metrics(objective, graphdef, mesh)

  def validate(params) -> dict | None:
    total, count = None, 0
    for i, local in enumerate(pipeline.eval_batches(prepared, "valid", config.batch_size)):
      if config.train.eval_batches and count == config.train.eval_batches:
        break
      value = metrics(params, pipeline.to_global(local, batch_sharding),
                      jax.random.fold_in(rng, i), frozen)
      total = value if total is None else jax.tree.map(jnp.add, total, value)
      count += 1
    return None if not count else {k: float(v) / count for k, v in total.items()}
  return validate


class Validation:
  """Every `every` steps and at the end: the validation metrics of the EMA weights, each
  function's under its prefix (valid_PREFIXMETRIC, e.g. valid_loss, valid_distill_loss)."""

  def __init__(self, losses: dict, log: outputs.MetricsLog, every: int):
    self.losses, self.log, self.every = losses, log, every

  def after_step(self, end: StepEnd) -> None:
    if not end.due(self.every):
      return
    for prefix, validate in self.losses.items():
      metrics = validate(end.state["ema"])
      if metrics is not None:
        self.log.write(end.step, {f"valid_{prefix}{k}": v for k, v in metrics.items()})
        outputs.say(f"step {end.step} | validation {prefix}loss (EMA) {metrics['loss']:.4f}")


class Samples:
  """Every `every` steps and at the end: samples of the EMA weights, decoded to
  WORKDIR/samples/step_N.json."""

  def __init__(self, directory, samplers: dict, graphdef, tokenizer, seed: int, every: int):
    self.directory, self.samplers, self.graphdef = directory, samplers, graphdef
    self.tokenizer, self.seed, self.every = tokenizer, seed, every

  def after_step(self, end: StepEnd) -> None:
    if not end.due(self.every):
      return
    written = outputs.write_samples(self.directory / f"step_{end.step}.json", self.samplers,
                                    self.graphdef, end.state["ema"], self.tokenizer,
                                    jax.random.PRNGKey(self.seed))
    for name, texts in written.items():
      outputs.say(f"step {end.step} | {name}: {texts[0][:160]!r}")


class Checkpointing:
  """Saves every `every` steps, at the end and at a stop, with the data position and the
  run record; never after a non-finite loss."""

  def __init__(self, checkpoints: checkpoint.Checkpoints, batches, record: dict,
               guard: FiniteGuard, every: int, last_saved: int | None):
    self.checkpoints, self.batches, self.record = checkpoints, batches, record
    self.guard, self.every = guard, every
    self.guard.last_saved = last_saved

  def after_step(self, end: StepEnd) -> None:
    if end.due(self.every) or end.stopping:
      self.save(end.step, end.state)

  def save(self, step: int, state: dict) -> None:
    self.guard.check(self.checkpoints.directory)
    if step != self.guard.last_saved:
      self.checkpoints.save(step, state, self.batches, self.record)
      self.guard.last_saved = step


# The sync points every process passes, one per training step, numbered over the whole
# process (a resumed run's or a pipeline's later stage's steps would not match the point
# that a notice before them sets, one past the last passed).
_SYNC_POINTS = itertools.count(1)


class StopRequest:
  """Turns SIGTERM, and in one process Ctrl-C (SIGINT), into a stop after the current step;
  a Ctrl-C after either stops at once (KeyboardInterrupt). In one process its own handlers catch
  the signals; with several (jax.distributed), JAX's preemption service catches SIGTERM, in
  whichever process it reaches, and every process stops after the same step, the first
  that all of them reach after it (asked at every step, without a device sync). Without
  that service (jax_enable_preemption_service off), SIGTERM ends the processes as it ends
  any program, and the last checkpoint stays; Ctrl-C there stops each process at once."""

  def __init__(self):
    self.requested: int | None = None  # the signal that asked for the stop
    self.several = jax.process_count() > 1
    self.service = self.several and jax.config.jax_enable_preemption_service
    if not self.several:
      self._previous = {s: signal.signal(s, self._handle)
                        for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested is not None:
      raise KeyboardInterrupt
    self.requested = signum  # a SIGTERM after a Ctrl-C: the run is unfinished (143)

  @property
  def interrupted(self) -> bool:
    """Whether Ctrl-C, rather than SIGTERM, asked for the stop."""
    return self.requested == signal.SIGINT

  def agreed(self) -> bool:
    """Whether to stop after the step just taken."""
    if self.service:
      return multihost_utils.reached_preemption_sync_point(next(_SYNC_POINTS))
    return self.requested is not None

  def restore(self) -> None:
    if not self.several:
      for signum, previous in self._previous.items():
        signal.signal(signum, previous)
