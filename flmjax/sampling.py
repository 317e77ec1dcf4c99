"""Compiled samplers: the Euler sampler of FLM (the paper's FLM sampler) and the flow-map
sampler of FMLM with churn (section 5).

tau_i = linspace(0, 1, N + 1), t_i = t(tau_i), computed on the host in float64. For
i < N - 1: D = softmax(net(z, tau_i)); z <- z + (t_{i+1} - t_i) (D - z) / (1 - t_i).
The last step returns D itself; tokens are its argmax. N network evaluations.

Every update is linear in z and the network reads z only through z @ E, so the sampler
carries h = z @ E [B, L, D] instead of z [B, L, V]: h <- h + a_i (D @ E - h). D @ E is the
only V-sized product per step besides the logits. The V-space sampler (`latent=False`)
is kept for parity. One jitted function per (B, L, N): the step count is the static
length of the time grid.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flmjax import flow, sharding
from flmjax.schedule import get_schedule

HIGHEST = jax.lax.Precision.HIGHEST


def _mesh(params):
  """The mesh the parameters are placed on (None when they are not on one)."""
  placement = getattr(params["vocab_embed"], "sharding", None)
  return placement.mesh if isinstance(placement, jax.sharding.NamedSharding) else None


def _whole(tokens, mesh):
  """Tokens replicated, so that every process can read all of them."""
  if mesh is None:
    return tokens
  return jax.lax.with_sharding_constraint(tokens, sharding.replicated(mesh))


def euler_grid(vocab_size: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(tau_i [steps], a_i [steps - 1]) in float64: the times of the N network evaluations
  and the Euler coefficients a_i = (t_{i+1} - t_i) / (1 - t_i)."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  tau = np.linspace(0.0, 1.0, steps + 1)
  t = get_schedule(vocab_size).t_host(tau)
  return tau[:steps], (t[1:steps] - t[:steps - 1]) / (1 - t[:steps - 1])


def _integrate(model, state, tau, coeff, latent: bool) -> jax.Array:
  """Runs the Euler steps from state (h [B, L, D] if latent, else z [B, L, V]) and returns
  the last denoiser probabilities [B, L, V]."""
  embed = model.vocab_embed[...]
  batch = state.shape[0]

  def denoise(state, tau_i):
    h = state if latent else model.embed(state)
    return jax.nn.softmax(model(h, jnp.full((batch,), tau_i)), axis=-1)

  def step(state, inputs):
    tau_i, a_i = inputs
    probs = denoise(state, tau_i)
    target = jnp.matmul(probs, embed, precision=HIGHEST) if latent else probs
    return state + a_i * (target - state), None

  state, _ = jax.lax.scan(step, state, (tau[:-1], coeff))
  return denoise(state, tau[-1])


@functools.partial(jax.jit, static_argnames=("graphdef", "latent"))
def euler_from(graphdef, params, z, tau, coeff, latent: bool = True) -> jax.Array:
  """Euler-samples from a given V-space noise z [B, L, V]; returns probabilities [B, L, V].

  With latent=True the state starts at z @ E and stays in D dimensions.
  """
  model = nnx.merge(graphdef, params)
  state = model.embed(z) if latent else z
  return _integrate(model, state, tau.astype(jnp.float32), coeff.astype(jnp.float32), latent)


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "seq_len", "latent",
                                             "mesh"))
def euler_tokens(graphdef, params, rng, tau, coeff, batch_size, seq_len, latent, mesh=None):
  """Tokens [batch_size, seq_len] int32 from fresh noise and a grid from `euler_grid`;
  with `mesh`, the samples are split over its batch axes and the tokens replicated."""
  model = nnx.merge(graphdef, params)
  shape = (batch_size, seq_len)
  if latent:
    state = flow.embedded_noise(rng, model.vocab_embed[...], shape)
  else:
    state = jax.random.normal(rng, (*shape, model.vocab_size), jnp.float32)
  with sharding.tracing_under(mesh):
    probs = _integrate(model, state, tau.astype(jnp.float32), coeff.astype(jnp.float32),
                       latent)
  return _whole(jnp.argmax(probs, axis=-1).astype(jnp.int32), mesh)


def sample_flm(graphdef, params, rng: jax.Array, batch_size: int, seq_len: int, steps: int,
               *, latent: bool = True) -> jax.Array:
  """Tokens [batch_size, seq_len] int32 from `steps` Euler steps of an FLM denoiser."""
  tau, coeff = euler_grid(params["vocab_embed"].shape[0], steps)
  return euler_tokens(graphdef, params, rng, tau, coeff, batch_size, seq_len, latent,
                      _mesh(params))


def flow_map_grid(vocab_size: int, steps: int, gamma: float) -> dict[str, np.ndarray]:
  """Host float64 grid of the flow-map sampler with churn gamma in [0, 1].

  Step i evaluates delta(z; tau_i, tau~_i) with sigma = 1 - t_{i+1},
  sigma~ = sigma sqrt(1 - gamma^2), t~ = 1 - sigma~, tau~ = tau(t~); then (i < N - 1)
  z <- ((1 - t~) / (1 - t_i)) z + ((t~ - t_i) / (1 - t_i) + sigma~ - sigma) D + gamma sigma eps.
  Returns tau, tau_tilde [N] and keep, move, noise [N - 1]: z <- keep z + move D + noise eps.
  """
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  if not 0 <= gamma <= 1:
    raise ValueError(f"the churn gamma must be in [0, 1], got {gamma}")
  schedule = get_schedule(vocab_size)
  tau = np.linspace(0.0, 1.0, steps + 1)
  t = schedule.t_host(tau)
  sigma = 1 - t[1:]
  sigma_tilde = sigma * np.sqrt(1 - gamma**2)
  t_tilde = 1 - sigma_tilde
  t_i = t[:-1]
  keep = (1 - t_tilde) / (1 - t_i)
  move = (t_tilde - t_i) / (1 - t_i) + sigma_tilde - sigma
  return {"tau": tau[:-1], "tau_tilde": schedule.tau_host(t_tilde), "keep": keep[:-1],
          "move": move[:-1], "noise": (gamma * sigma)[:-1]}


def _flow_map_integrate(model, state, grid, rng, latent: bool, churn: bool) -> jax.Array:
  """The flow-map steps from state (h [B, L, D] if latent, else z [B, L, V]); returns the
  last step's probabilities [B, L, V]."""
  embed = model.vocab_embed[...]
  batch = state.shape[0]
  factor = flow.noise_factor(embed) if churn and latent and embed.shape[0] > embed.shape[1] \
      else None

  def denoise(state, tau_s, tau_t):
    h = state if latent else model.embed(state)
    return jax.nn.softmax(model(h, jnp.full((batch,), tau_s), jnp.full((batch,), tau_t)),
                          axis=-1)

  def step(state, inputs):
    tau_s, tau_t, keep, move, noise, key = inputs
    probs = denoise(state, tau_s, tau_t)
    target = jnp.matmul(probs, embed, precision=HIGHEST) if latent else probs
    state = keep * state + move * target
    if churn:
      if latent:
        eps = flow.embedded_noise(key, embed, state.shape[:2], factor=factor)
      else:
        eps = jax.random.normal(key, state.shape, jnp.float32)
      state = state + noise * eps
    return state, None

  count = len(grid["keep"])
  inputs = (grid["tau"][:-1], grid["tau_tilde"][:-1], grid["keep"], grid["move"],
            grid["noise"], jax.random.split(rng, count))
  state, _ = jax.lax.scan(step, state, inputs)
  return denoise(state, grid["tau"][-1], grid["tau_tilde"][-1])


@functools.partial(jax.jit, static_argnames=("graphdef", "latent", "churn"))
def flow_map_from(graphdef, params, z, grid, rng, latent: bool = True,
                  churn: bool = False) -> jax.Array:
  """Flow-map sampling from a given V-space noise z [B, L, V]; probabilities [B, L, V]."""
  model = nnx.merge(graphdef, params)
  state = model.embed(z) if latent else z
  grid = jax.tree.map(lambda x: x.astype(jnp.float32), grid)
  return _flow_map_integrate(model, state, grid, rng, latent, churn)


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "seq_len", "latent",
                                             "churn", "mesh"))
def flow_map_tokens(graphdef, params, rng, grid, batch_size, seq_len, latent, churn,
                    mesh=None):
  """Tokens [batch_size, seq_len] int32 from fresh noise and a `flow_map_grid`; with
  `mesh`, the samples are split over its batch axes and the tokens replicated."""
  model = nnx.merge(graphdef, params)
  rng_init, rng_churn = jax.random.split(rng)
  shape = (batch_size, seq_len)
  if latent:
    state = flow.embedded_noise(rng_init, model.vocab_embed[...], shape)
  else:
    state = jax.random.normal(rng_init, (*shape, model.vocab_size), jnp.float32)
  grid = jax.tree.map(lambda x: x.astype(jnp.float32), grid)
  with sharding.tracing_under(mesh):
    probs = _flow_map_integrate(model, state, grid, rng_churn, latent, churn)
  return _whole(jnp.argmax(probs, axis=-1).astype(jnp.int32), mesh)


def sample_flow_map(graphdef, params, rng: jax.Array, batch_size: int, seq_len: int,
                    steps: int, *, gamma: float = 0.0, latent: bool = True) -> jax.Array:
  """Tokens [batch_size, seq_len] int32 from `steps` flow-map steps of an FMLM student
  (one step is delta_{0,1}(z))."""
  grid = flow_map_grid(params["vocab_embed"].shape[0], steps, gamma)
  return flow_map_tokens(graphdef, params, rng, grid, batch_size, seq_len, latent,
                         gamma > 0 and steps > 1, _mesh(params))
