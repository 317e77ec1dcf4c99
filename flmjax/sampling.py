"""Compiled samplers (REFERENCE.md section 4): the deterministic Euler sampler of FLM.

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

from flmjax import flow
from flmjax.schedule import get_schedule

HIGHEST = jax.lax.Precision.HIGHEST


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


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "seq_len", "latent"))
def euler_tokens(graphdef, params, rng, tau, coeff, batch_size, seq_len, latent):
  """Tokens [batch_size, seq_len] int32 from fresh noise and a grid from `euler_grid`."""
  model = nnx.merge(graphdef, params)
  shape = (batch_size, seq_len)
  if latent:
    state = flow.embedded_noise(rng, model.vocab_embed[...], shape)
  else:
    state = jax.random.normal(rng, (*shape, model.vocab_size), jnp.float32)
  probs = _integrate(model, state, tau.astype(jnp.float32), coeff.astype(jnp.float32),
                     latent)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32)


def sample_flm(graphdef, params, rng: jax.Array, batch_size: int, seq_len: int, steps: int,
               *, latent: bool = True) -> jax.Array:
  """Tokens [batch_size, seq_len] int32 from `steps` Euler steps of an FLM denoiser."""
  tau, coeff = euler_grid(params["vocab_embed"].shape[0], steps)
  return euler_tokens(graphdef, params, rng, tau, coeff, batch_size, seq_len, latent)
