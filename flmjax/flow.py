"""The flow's pure math (REFERENCE.md sections 1 and 2): interpolant, noise, velocity, loss.

Data are one-hot tokens x1 [B, L, V], noise eps ~ N(0, I) of the same shape, and
x_t = (1 - t) eps + t x1 (noise at t = 0, data at t = 1). The network sees x_t only
through h_t = x_t @ E [B, L, D], so the V-dimensional tensors are never needed:
x1 @ E = E[tokens] is a gather, and eps @ E ~ N(0, E^T E) is drawn as xi @ C^T with
C = cholesky(E^T E) and xi ~ N(0, I_D) ("latent" noise). The literal V-space draw is kept
(`latent=False`) to prove the two agree.

The latent draw is a different function of E than eps @ E, but the same distribution for
every E; so the expected loss, and hence the expected gradient, is the same in both.
No Flax here: the denoiser is any function (h, tau, dropout_rng) -> logits.
"""

from typing import Callable

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
VELOCITY_EPS = 1e-5  # the reference's guard on 1 - t in the velocity


def stratified_uniform(rng: jax.Array, n: int) -> jax.Array:
  """n stratified draws on [0, 1): u_i = (r / n + i / n) mod 1, randomly permuted [n]."""
  rng_offset, rng_perm = jax.random.split(rng)
  offset = jax.random.uniform(rng_offset, ())
  u = jnp.mod(offset / n + jnp.arange(n) / n, 1.0)
  return jax.random.permutation(rng_perm, u)


def interpolate(noise, data, t):
  """x_t = (1 - t) noise + t data, with t [B] broadcast over the trailing axes."""
  t = t.reshape(t.shape + (1,) * (noise.ndim - t.ndim))
  return (1 - t) * noise + t * data


def velocity(x, denoised, t):
  """b_t(x) = (D_t(x) - x) / (1 - t + 1e-5), t [B]."""
  t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
  return (denoised - x) / (1 - t + VELOCITY_EPS)


def noise_factor(embed: jax.Array) -> jax.Array:
  """C [D, D] with C C^T = E^T E, for embed E [V, D] with V > D."""
  gram = jnp.matmul(embed.T, embed, precision=HIGHEST)
  return jnp.linalg.cholesky(gram)


def embedded_noise(rng: jax.Array, embed: jax.Array, shape: tuple[int, ...],
                   latent: bool = True) -> jax.Array:
  """eps @ E [*shape, D] for eps ~ N(0, I_V) [*shape, V].

  Latent (the default when V > D): xi @ C^T with xi ~ N(0, I_D), never building eps.
  Otherwise (or when V <= D, where E^T E is singular) eps is drawn and projected.
  """
  vocab_size, dim = embed.shape
  if latent and vocab_size > dim:
    xi = jax.random.normal(rng, (*shape, dim), jnp.float32)
    return jnp.matmul(xi, noise_factor(embed).T, precision=HIGHEST)
  eps = jax.random.normal(rng, (*shape, vocab_size), jnp.float32)
  return jnp.matmul(eps, embed, precision=HIGHEST)


def noisy_latent(rng: jax.Array, embed: jax.Array, tokens: jax.Array, t: jax.Array,
                 latent: bool = True) -> jax.Array:
  """h_t = x_t @ E [B, L, D] for tokens [B, L] at times t [B]."""
  return interpolate(embedded_noise(rng, embed, tokens.shape, latent), embed[tokens], t)


def token_cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """-log softmax(logits)[token] = logsumexp(logits) - logits[token], [B, L] float32.

  Written without log_softmax so that no second [B, L, V] array is kept for backward.
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def flm_loss(denoiser: Callable, embed: jax.Array, tokens: jax.Array, rng: jax.Array,
             schedule, *, mask: jax.Array | None = None, latent: bool = True,
             loss_weight: Callable | None = None) -> tuple[jax.Array, dict]:
  """The FLM objective: cross entropy of the denoiser at x_t, token-weighted mean.

  tau ~ U[0, 1] stratified over the (global) batch, t = t(tau), the network conditioned on
  tau. `mask` [B, L] marks valid tokens (all by default). `loss_weight(tau) -> w [B]`
  turns each token's loss into exp(-w) * loss + w.
  """
  rng_tau, rng_noise, rng_dropout = jax.random.split(rng, 3)
  tau = stratified_uniform(rng_tau, tokens.shape[0])
  t = schedule.t(tau)
  logits = denoiser(noisy_latent(rng_noise, embed, tokens, t, latent), tau, rng_dropout)
  cross_entropy = token_cross_entropy(logits, tokens)
  token_loss = cross_entropy
  if loss_weight is not None:
    w = loss_weight(tau)[:, None]
    token_loss = jnp.exp(-w) * cross_entropy + w
  mask = jnp.ones_like(cross_entropy) if mask is None else mask.astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  loss = (token_loss * mask).sum() / count
  return loss, {"loss": loss, "cross_entropy": (cross_entropy * mask).sum() / count}
