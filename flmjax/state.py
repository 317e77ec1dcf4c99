"""The train state: its layout on the mesh, its initialisation, and one update.

The state is a plain pytree {step, params, ema, opt_state, rng}. `train_step` is a pure
function of (state, batch, frozen) -> (state, metrics); `compile_step` jits it with the
mesh's shardings, the state donated, and compiles it ahead of the first batch. An
objective is any function (model, batch, rng, frozen) -> (loss, metrics); `frozen` holds
arrays it reads but does not train: a distillation teacher's params, else {"step": the
step} (None in validation). A run whose teacher is the student itself as it was at the
start of a round (teacher_every steps; Duo's consistency distillation) keeps that copy in
the state under "teacher" and gets `frozen` = {"params": the round's teacher, "step": the
step}.

Recipe (the paper's training recipe): AdamW with gradient clipping by global norm, linear
warmup then constant; EMA with decay min(ema_decay, (1 + n) / (10 + n)) after the n-th
update.
"""

import ctypes
import dataclasses
import os
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flmjax import outputs, sharding
from flmjax.errors import UsageError

ObjectiveFn = Callable  # (model, batch, rng, frozen, part=(0, 1)) -> (loss, metrics)


def learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant."""
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate,
                                                     cfg.warmup_steps),
                               optax.constant_schedule(cfg.learning_rate)],
                              [cfg.warmup_steps])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Gradients times min(1, max_norm / (norm + 1e-6)), norm their global norm: PyTorch's
  clip_grad_norm_, which the reference's trainer applies. A product with one scalar, so
  XLA fuses it into AdamW's moment updates (optax's clip_by_global_norm divides by the
  norm, and XLA:CPU stores the divided gradients, a pass over all parameters)."""
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (the `train` section of a config)."""
  return optax.chain(
      clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay))


def ema_decay(updates: jax.Array, max_decay: float) -> jax.Array:
  """The EMA decay after `updates` optimizer updates: min(max, (1 + n) / (10 + n))."""
  return jnp.minimum(max_decay, (1.0 + updates) / (10.0 + updates))


@dataclasses.dataclass
class Layout:
  """Where a run's state lives: the mesh, the model's graph, the optimizer, and the
  state's shardings and shapes (ShapeDtypeStructs carrying their shardings)."""
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict
  teacher_every: int = 0  # the state's teacher is the params at multiples of this step

  @property
  def param_shardings(self):
    return self.state_shardings["params"]


def param_layout(build: Callable[[], nnx.Module], mesh) -> tuple[nnx.GraphDef, dict]:
  """The graph of the module `build()` makes, and its parameters as ShapeDtypeStructs
  carrying their shardings on `mesh`; nothing is allocated."""
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  params = nnx.to_pure_dict(abstract)
  names = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  whole = set().union(*(sharding.kept_whole(tuple(n), x.shape, mesh) for x, n in zip(
      jax.tree.leaves(params), jax.tree.leaves(names, is_leaf=is_spec))))
  if whole:
    outputs.say(f"mesh {dict(mesh.shape)}: the parameters' dimensions {', '.join(sorted(whole))}"
                " are kept whole on every device, their mesh axis does not divide them "
                "(sharding.RULES)")
  return graphdef, jax.tree.map(
      lambda x, spec: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding.logical_sharding(tuple(spec), x.shape, mesh)),
      params, names, is_leaf=is_spec)


def plan(config: ml_collections.ConfigDict, build: Callable[[], nnx.Module], mesh, *,
         teacher_every: int = 0) -> Layout:
  """The layout of the train state whose params `build()` makes (with a "teacher" copy of
  them, refreshed every `teacher_every` steps, if that is not 0), without allocating."""
  tx = make_optimizer(config.train)
  graphdef, abstract_params = param_layout(build, mesh)
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
  if teacher_every:
    shardings["teacher"], abstract_state["teacher"] = param_shardings, abstract_params
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      shardings)
  return Layout(mesh, graphdef, tx, shardings, abstract_state, teacher_every)


def random_params(layout: Layout, build: Callable[[], nnx.Module]):
  """Freshly initialised parameters of `build()`, created directly with their shardings."""
  return jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(), nnx.Param)),
                 out_shardings=layout.param_shardings)()


def init_state(layout: Layout, params, seed: int) -> dict:
  """A fresh train state around `params`: EMA (and teacher, if the layout has one) equal
  to them, a new optimizer state."""
  def init(params):
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema": params,
             "opt_state": layout.tx.init(params), "rng": jax.random.PRNGKey(seed)}
    if layout.teacher_every:
      state["teacher"] = params
    return state
  return jax.jit(init, in_shardings=(layout.param_shardings,),
                 out_shardings=layout.state_shardings)(params)


def _microbatches(batch, count: int):
  """[B, ...] -> [count, B / count, ...] with microbatch i = rows i::count, so each device
  keeps its share of every microbatch."""
  def split(x):
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def _gradients(loss_fn, params, batch, rng, parts: int):
  """(gradients, metrics) of loss_fn(params, batch, rng, (index, parts)), averaged over
  `parts` equal parts of the batch (one at a time, each with its own key)."""
  def gradients(part, key, index):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, part, key, (index, parts))
    return grads, metrics

  if parts == 1:
    return gradients(batch, rng, 0)
  split, keys = _microbatches(batch, parts), jax.random.split(rng, parts)
  indices = jnp.arange(parts)
  total = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
      gradients, jax.tree.map(lambda x: x[0], split), keys[0], indices[0]))
  total, _ = jax.lax.scan(
      lambda total, part: (jax.tree.map(jnp.add, total, gradients(*part)), None),
      total, (split, keys, indices))
  return jax.tree.map(lambda x: x / parts, total)


def train_step(state: dict, batch: dict, frozen, *, graphdef, tx, objective: ObjectiveFn,
               cfg: ml_collections.ConfigDict, teacher_every: int = 0) -> tuple[dict, dict]:
  """One optimizer update on the global batch (accumulated over cfg.grad_accum parts);
  with `teacher_every`, the state's teacher is first set to the params at every multiple
  of that many steps."""
  rng = jax.random.fold_in(state["rng"], state["step"])
  if teacher_every:
    new_round = state["step"] % teacher_every == 0
    state = dict(state, teacher=jax.tree.map(lambda t, p: jnp.where(new_round, p, t),
                                             state["teacher"], state["params"]))
    frozen = {"params": state["teacher"], "step": state["step"]}
  elif frozen is None:
    frozen = {"step": state["step"]}

  def loss_fn(params, batch, key, part):
    return objective(nnx.merge(graphdef, params), batch, key, frozen, part=part)

  grads, metrics = _gradients(loss_fn, state["params"], batch, rng, cfg.grad_accum)
  with jax.named_scope("optimizer"):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay(state["step"] + 1, cfg.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
  grad_norm = optax.tree.norm(grads)
  metrics = dict(metrics, grad_norm=grad_norm, lr=learning_rate(cfg)(state["step"]),
                 # the step number if this step's loss or gradient is not finite, else 0
                 nonfinite_step=jnp.where(jnp.isfinite(metrics["loss"]) &
                                          jnp.isfinite(grad_norm), 0, state["step"] + 1))
  return dict(state, step=state["step"] + 1, params=params, ema=ema,
              opt_state=opt_state), metrics


def step_function(layout: Layout, objective: ObjectiveFn, cfg, frozen_shardings=None):
  """train_step jitted with the layout's shardings, traced under its mesh (so the model
  keeps activations split over the batch axes); the state is donated."""
  def step(state, batch, frozen):
    with sharding.tracing_under(layout.mesh):
      return train_step(state, batch, frozen, graphdef=layout.graphdef, tx=layout.tx,
                        objective=objective, cfg=cfg, teacher_every=layout.teacher_every)

  return jax.jit(
      step,
      in_shardings=(layout.state_shardings, sharding.batch_sharding(layout.mesh),
                    frozen_shardings),
      out_shardings=(layout.state_shardings, sharding.replicated(layout.mesh)),
      donate_argnums=0)


def abstract_batch(layout: Layout, batch_size: int, seq_len: int) -> dict:
  """The shape and sharding of a global batch of tokens."""
  return {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                                         sharding=sharding.batch_sharding(layout.mesh))}


def compile_step(layout: Layout, objective: ObjectiveFn, config: ml_collections.ConfigDict,
                 frozen=None):
  """The train step compiled for config.batch_size x data.seq_len batches (and `frozen`,
  arrays or ShapeDtypeStructs with shardings), then the compiler's freed heap handed back."""
  frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
  compiled = step_function(layout, objective, config.train, frozen_shardings).lower(
      layout.abstract_state, abstract_batch(layout, config.batch_size, config.data.seq_len),
      frozen).compile()
  release_host_memory()
  return compiled


def use_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` (for computations that
  take a second or more to compile), unless it is "" or JAX_COMPILATION_CACHE_DIR is set
  (JAX then uses that one)."""
  if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  directory = os.path.expanduser(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UsageError(f"compilation_cache_dir={directory} is a file; give a directory, or "
                     "\"\" to compile without the cache.")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def release_host_memory() -> None:
  """Hands freed heap pages back to the OS (glibc's malloc_trim; nothing elsewhere). XLA's
  compiler frees its working memory when it is done, but glibc keeps the pages, so the
  process would go on holding its compile-time peak."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass
