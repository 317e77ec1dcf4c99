"""The one training loop: FLM teacher training now, distillation by swapping the objective.

The train state is a plain pytree {step, params, ema, opt_state, rng}; `train_step` is a
pure function of (state, batch, frozen) jitted with the mesh's shardings and with the
state donated. An objective is any function (model, batch, rng, frozen) -> (loss,
metrics); `frozen` holds arrays it reads but does not train (a distillation teacher), and
is None for FLM.

Recipe (the paper's training recipe): AdamW with gradient clipping by global norm, linear
warmup then constant; EMA with decay min(ema_decay, (1 + n) / (10 + n)) after the n-th
update. Validation loss and samples use the EMA weights.
"""

import ctypes
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Callable

from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flmjax import checkpoint, flow, sampling, sharding
from flmjax.data import pipeline
from flmjax.errors import Stopped, UsageError
from flmjax.models import dit
from flmjax.schedule import get_schedule

Objective = Callable  # (model, batch, rng, frozen) -> (loss, metrics)


def learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant."""
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate,
                                                     cfg.warmup_steps),
                               optax.constant_schedule(cfg.learning_rate)],
                              [cfg.warmup_steps])


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (the `train` section of a config)."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay))


def ema_decay(updates: jax.Array, max_decay: float) -> jax.Array:
  """The EMA decay after `updates` optimizer updates: min(max, (1 + n) / (10 + n))."""
  return jnp.minimum(max_decay, (1.0 + updates) / (10.0 + updates))


def denoising_objective(config: ml_collections.ConfigDict, vocab_size: int, *,
                        dropout: bool = True) -> Objective:
  """The FLM cross entropy (flow.flm_loss) of the model; dropout only when training."""
  if config.noise not in ("latent", "vocab"):
    raise UsageError(f"noise={config.noise!r} must be 'latent' or 'vocab'.")
  schedule = get_schedule(vocab_size)

  def objective(model, batch, rng, frozen):
    del frozen

    def denoiser(h, tau, key):
      return model(h, tau, dropout_rng=key if dropout else None, capped=False)

    return flow.flm_loss(denoiser, model.vocab_embed[...], batch["tokens"], rng, schedule,
                         latent=config.noise == "latent", cap=model.output_cap,
                         loss_weight=model.loss_weight if model.loss_weight_mlp else None)
  return objective


def _microbatches(batch, count: int):
  """[B, ...] -> [count, B / count, ...] with microbatch i = rows i::count, so each device
  keeps its share of every microbatch."""
  def split(x):
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def train_step(state: dict, batch: dict, frozen, *, graphdef, tx, objective: Objective,
               cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """One optimizer update on the global batch (accumulated over cfg.grad_accum parts)."""
  rng = jax.random.fold_in(state["rng"], state["step"])

  def loss_fn(params, microbatch, key):
    return objective(nnx.merge(graphdef, params), microbatch, key, frozen)

  def gradients(microbatch, key):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], microbatch, key)
    return grads, metrics

  if cfg.grad_accum == 1:
    grads, metrics = gradients(batch, rng)
  else:
    parts = _microbatches(batch, cfg.grad_accum)
    keys = jax.random.split(rng, cfg.grad_accum)
    total = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
        gradients, jax.tree.map(lambda x: x[0], parts), keys[0]))
    (grads, metrics), _ = jax.lax.scan(
        lambda total, part: (jax.tree.map(jnp.add, total, gradients(*part)), None),
        total, (parts, keys))
    grads, metrics = jax.tree.map(lambda x: x / cfg.grad_accum, (grads, metrics))
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  decay = ema_decay(state["step"] + 1, cfg.ema_decay)
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                 lr=learning_rate(cfg)(state["step"]),
                 # the step number if this step's loss is not finite, else 0
                 nonfinite_step=jnp.where(jnp.isfinite(metrics["loss"]), 0, state["step"] + 1))
  return dict(state, step=state["step"] + 1, params=params, ema=ema,
              opt_state=opt_state), metrics


@dataclasses.dataclass
class Run:
  """What a run is made of: the mesh, the model's graph and the state's layout."""
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict

  @property
  def param_shardings(self):
    return self.state_shardings["params"]


def param_layout(params_fn: Callable, mesh) -> tuple[nnx.GraphDef, dict]:
  """The graph of the module `params_fn()` builds, and its parameters as
  ShapeDtypeStructs carrying their shardings on `mesh`; nothing is allocated."""
  graphdef, abstract = nnx.split(nnx.eval_shape(params_fn))
  names = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  return graphdef, jax.tree.map(
      lambda x, spec: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding.logical_sharding(tuple(spec), x.shape, mesh)),
      nnx.to_pure_dict(abstract), names,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def plan(config: ml_collections.ConfigDict, params_fn: Callable, mesh) -> Run:
  """Shapes and shardings of the train state whose params come from `params_fn()` (a
  function returning an nnx Module of Params), without allocating anything."""
  tx = make_optimizer(config.train)
  graphdef, abstract_params = param_layout(params_fn, mesh)
  param_shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  replicated = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  shardings = {"step": replicated, "params": param_shardings, "ema": param_shardings,
               "opt_state": opt_shardings, "rng": replicated}
  abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                    "params": abstract_params, "ema": abstract_params,
                    "opt_state": abstract_opt,
                    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      shardings)
  return Run(mesh, graphdef, tx, shardings, abstract_state)


def random_params(run: Run, params_fn: Callable):
  """Freshly initialised parameters of `params_fn()`, created directly with their
  shardings."""
  return jax.jit(lambda: nnx.to_pure_dict(nnx.state(params_fn(), nnx.Param)),
                 out_shardings=run.param_shardings)()


def init_state(run: Run, params, seed: int) -> dict:
  """A fresh train state around `params`: EMA equal to them, a new optimizer state."""
  def init(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": params,
            "opt_state": run.tx.init(params), "rng": jax.random.PRNGKey(seed)}
  return jax.jit(init, in_shardings=(run.param_shardings,),
                 out_shardings=run.state_shardings)(params)


def release_host_memory() -> None:
  """Hands freed heap pages back to the OS (glibc's malloc_trim; nothing elsewhere). XLA's
  compiler frees its working memory when it is done, but glibc keeps the pages, so the
  process would go on holding its compile-time peak."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def compile_step(run: Run, objective: Objective, cfg, frozen_shardings=None):
  """train_step jitted with the run's shardings, traced under the run's mesh (so the model
  keeps activations split over the batch axes); the state is donated."""
  batch_sharding = sharding.batch_sharding(run.mesh)

  def step(state, batch, frozen):
    with sharding.tracing_under(run.mesh):
      return train_step(state, batch, frozen, graphdef=run.graphdef, tx=run.tx,
                        objective=objective, cfg=cfg)

  return jax.jit(
      step,
      in_shardings=(run.state_shardings, batch_sharding, frozen_shardings),
      out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
      donate_argnums=0)


def say(message: str) -> None:
  """A line for the person running the job (process 0 only)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def check_workdir(workdir: str) -> epath.Path:
  """Creates the workdir (local, or on cloud storage as gs://...) and proves it writable,
  before anything is compiled."""
  path = epath.Path(workdir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UsageError(f"--workdir={workdir} is not writable ({e.strerror}); choose another "
                     "directory.") from None
  return path


class _StopRequest:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Logger:
  """metrics.jsonl and a progress line on process 0; TensorBoard when tensorboardX is
  installed. The file is rewritten whole at each write (cloud storage cannot append)."""

  def __init__(self, workdir: epath.Path, total_steps: int):
    self.main = jax.process_index() == 0
    self.total_steps = total_steps
    self.metrics_file = workdir / "metrics.jsonl"
    self.lines = self.metrics_file.read_text() if self.main and self.metrics_file.exists() \
        else ""
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
    self.lines += json.dumps({"step": step, **metrics}) + "\n"
    partial = self.metrics_file.parent / (self.metrics_file.name + ".partial")
    partial.write_text(self.lines)
    partial.replace(self.metrics_file)  # a killed write leaves the previous file whole
    if self.tensorboard is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)):
          self.tensorboard.add_scalar(name, value, step)
      self.tensorboard.flush()

  def progress(self, step: int, metrics: dict) -> None:
    eta = (self.total_steps - step) * metrics["step_seconds"]
    say(f"step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | grad "
        f"{metrics['grad_norm']:.3f} | lr {metrics['lr']:.2e} | "
        f"{metrics['tokens_per_second']:,.0f} tokens/s | {metrics['step_seconds']:.3f} s/step "
        f"| ETA {int(eta // 3600)}:{time.strftime('%M:%S', time.gmtime(eta))}")


def make_validation(objective: Objective, graphdef, prepared, config, mesh):
  """A function params -> mean objective over the validation split (at most
  config.train.eval_batches batches, None if it has no full batch), with fixed noise so
  that values are comparable across a run."""
  batch_sharding = sharding.batch_sharding(mesh)
  rng = jax.random.PRNGKey(config.seed + 1)

  @jax.jit
  def loss(params, batch, key):
    return objective(nnx.merge(graphdef, params), batch, key, None)[0]

  def validate(params) -> float | None:
    total, count = 0.0, 0
    for i, local in enumerate(pipeline.eval_batches(prepared, "valid", config.batch_size)):
      if config.train.eval_batches and count == config.train.eval_batches:
        break
      total += float(loss(params, pipeline.to_global(local, batch_sharding),
                          jax.random.fold_in(rng, i)))
      count += 1
    return total / count if count else None
  return validate


def write_samples(path: epath.Path, samplers: dict, graphdef, params, tokenizer,
                  rng) -> dict[str, list[str]]:
  """Runs each sampler (graphdef, params, rng) -> tokens [N, L], decodes the tokens and
  writes {name: {seconds_per_sample, samples}} to `path` as JSON. Seconds include
  compilation the first time a sampler runs."""
  written, record = {}, {}
  for name, sampler in samplers.items():
    start = time.perf_counter()
    tokens = np.asarray(sampler(graphdef, params, rng))
    seconds = time.perf_counter() - start
    written[name] = tokenizer.decode_batch(tokens)
    record[name] = {"seconds_per_sample": seconds / len(tokens), "samples": written[name]}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
  return written


def fit(config: ml_collections.ConfigDict, workdir: str, prepared: pipeline.Prepared, *,
        params_fn: Callable, objective: Objective, samplers: dict, kind: str = "flm",
        initial_params: Callable | None = None, frozen=None, frozen_shardings=None,
        record_extra: dict | None = None) -> tuple[Run, dict]:
  """Trains from WORKDIR's latest checkpoint to config.train.steps and returns the run and
  its final train state.

  A fresh run starts from `initial_params(run)`, by default `params_fn()` freshly
  initialised. `samplers` maps names to functions (graphdef, params, rng) -> tokens, run
  on the EMA weights every train.sample_every steps. `kind` names the run ("flm" teacher,
  "fmlm" student) in its checkpoints, so that a checkpoint of another kind is refused;
  `record_extra` adds fields to the run record saved with them.
  """
  path = check_workdir(workdir)
  cfg = config.train
  mesh = sharding.make_mesh(config.mesh)
  parallel = sharding.data_parallel_size(mesh)
  if config.batch_size % (parallel * cfg.grad_accum):
    raise UsageError(f"batch_size={config.batch_size} must be a multiple of the data-parallel "
                     f"size {parallel} (mesh data x fsdp) times train.grad_accum="
                     f"{cfg.grad_accum}.")
  run = plan(config, params_fn, mesh)
  record = dict(checkpoint.run_record(config, prepared.tokenizer, kind), **(record_extra or {}))
  checkpoints = checkpoint.Checkpoints(path / "checkpoints", cfg.keep_checkpoints,
                                       cfg.keep_period)
  batches = iter(pipeline.train_batches(prepared, config.batch_size, config.seed))
  last_saved = checkpoints.latest_step()
  if last_saved is None:
    params = (initial_params or functools.partial(random_params, params_fn=params_fn))(run)
    state = init_state(run, params, config.seed)
  else:
    checkpoint.check_compatible(checkpoints.record(last_saved), record,
                                str(path / "checkpoints"))
    state = checkpoints.restore(last_saved, run.abstract_state, batches)
    say(f"resumed from {path / 'checkpoints'} at step {last_saved}")
  if jax.process_index() == 0:
    (path / "config.json").write_text(json.dumps(record, indent=1))

  step_fn = compile_step(run, objective, cfg, frozen_shardings)
  validate = make_validation(denoising_objective(config, prepared.tokenizer.vocab_size,
                                                 dropout=False),
                             run.graphdef, prepared, config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  logger = Logger(path, cfg.steps)
  stop = _StopRequest()
  step = first_step = int(state["step"])
  window, first_bad, window_steps, window_start = None, None, 0, time.perf_counter()

  def due(every: int) -> bool:
    return step == cfg.steps or bool(every and step % every == 0)

  def check_finite():
    if first_bad is not None and int(first_bad):
      kept = (f"the last good checkpoint is step {last_saved} in {path / 'checkpoints'}"
              if last_saved is not None else "no checkpoint was written")
      raise FloatingPointError(
          f"the loss became NaN or inf at step {int(first_bad)}; stopping, {kept}.")

  def stop_agreed() -> bool:
    """SIGTERM reaches processes at different times; they agree (at log steps) so that
    all of them save and stop at the same step."""
    if jax.process_count() == 1:
      return stop.requested
    return due(cfg.log_every) and bool(
        multihost_utils.process_allgather(np.asarray(stop.requested)).any())

  def save():
    nonlocal last_saved
    check_finite()
    if step != last_saved:
      checkpoints.save(step, state, batches, record)
      last_saved = step

  try:
    while step < cfg.steps:
      state, metrics = step_fn(state, pipeline.to_global(next(batches), batch_sharding),
                               frozen)
      step += 1
      if step == first_step + 1:  # that call compiled the step
        release_host_memory()
      nonfinite = metrics.pop("nonfinite_step")
      first_bad = nonfinite if first_bad is None else jnp.where(first_bad > 0, first_bad,
                                                                nonfinite)
      window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
      window_steps += 1
      stopping = stop_agreed()
      if due(cfg.log_every) or stopping:
        check_finite()
        elapsed = time.perf_counter() - window_start
        summary = {k: float(v) / window_steps for k, v in jax.device_get(window).items()}
        summary.update(step_seconds=elapsed / window_steps, tokens_per_second=(
            config.batch_size * config.data.seq_len * window_steps / elapsed))
        logger.write(step, summary)
        logger.progress(step, summary)
        window, window_steps, window_start = None, 0, time.perf_counter()
      if due(cfg.eval_every):
        valid = validate(state["ema"])
        if valid is not None:
          logger.write(step, {"valid_loss": valid})
          say(f"step {step} | validation loss (EMA) {valid:.4f}")
      if due(cfg.sample_every):
        written = write_samples(path / "samples" / f"step_{step}.json", samplers,
                                run.graphdef, state["ema"], prepared.tokenizer,
                                jax.random.PRNGKey(config.seed))
        for name, texts in written.items():
          say(f"step {step} | {name}: {texts[0][:160]!r}")
      if due(cfg.checkpoint_every) or stopping:
        save()
      if stopping:
        say(f"SIGTERM: saved step {step} to {path / 'checkpoints'}; stopping")
        raise Stopped(step)
      if not window_steps:  # time spent evaluating or saving is not training time
        window_start = time.perf_counter()
  except KeyboardInterrupt:
    try:
      save()
      say(f"interrupted: saved step {step} to {path / 'checkpoints'}")
    except RuntimeError:  # interrupted mid-step: the donated state is gone
      say(f"interrupted mid-step; the last checkpoint is step {last_saved}")
    raise
  finally:
    stop.restore()
    checkpoints.close()
  return run, state


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=train`: the FLM teacher."""
  check_workdir(workdir)
  if config.model.two_time:
    raise UsageError("model.two_time=True is the distilled student; --mode=train trains the "
                     "one-time FLM teacher.")
  prepared = pipeline.prepare(config, workdir)
  vocab_size = prepared.tokenizer.vocab_size

  def params_fn():
    return dit.from_config(config.model, vocab_size, nnx.Rngs(config.seed))

  samplers = {f"euler_{config.train.sample_steps}": functools.partial(
      sampling.sample_flm, batch_size=config.train.num_samples, seq_len=config.data.seq_len,
      steps=config.train.sample_steps, latent=config.noise == "latent")}
  return fit(config, workdir, prepared, params_fn=params_fn,
             objective=denoising_objective(config, vocab_size), samplers=samplers)[1]


def model_flops_per_token(config: ml_collections.ConfigDict, vocab_size: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward): the blocks' and output
  layer's matmuls (2 per multiply-add) and attention's two L x L products. The input
  projection is a gather in latent form and not counted."""
  d, depth, length = config.model.width, config.model.depth, config.data.seq_len
  block = 3 * d * d + d * d + 2 * config.model.mlp_ratio * d * d
  forward = 2 * (depth * block + d * vocab_size) + depth * 4 * length * d
  return 3.0 * forward

