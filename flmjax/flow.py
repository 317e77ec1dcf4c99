"""The flow's pure math: interpolant, noise, velocity and the FLM loss.

Data are one-hot tokens x1 [B, L, V], noise eps ~ N(0, I) of the same shape, and
x_t = (1 - t) eps + t x1 (noise at t = 0, data at t = 1). The network sees x_t only
through h_t = x_t @ E [B, L, D], so the V-dimensional tensors are never needed:
x1 @ E = E[tokens] is a gather, and eps @ E ~ N(0, E^T E) is drawn as xi @ C^T with
C = cholesky(E^T E) and xi ~ N(0, I_D) ("latent" noise). The literal V-space draw is kept
(`latent=False`) to prove the two agree.

The latent draw is a different function of E than eps @ E, but the same distribution for
every E; so the expected loss, and hence the expected gradient, is the same in both.
No Flax here: the denoiser is any function (h, tau, dropout_rng) -> logits.

Precision policy: every product with E (x @ E, D @ E, the noise factor and its draws)
runs at HIGHEST precision (`project`), since these are the network's float32 input; on
TPU the default would be one bfloat16 pass. The blocks' matmuls run in the model's dtype.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from flmjax import conditioning, sharding

HIGHEST = jax.lax.Precision.HIGHEST
DENOMINATOR_EPS = 1e-8  # the reference's guard in the flow map and semigroup coefficients


def project(x: jax.Array, embed: jax.Array) -> jax.Array:
  """x [..., V] @ E [V, D] in float32 at HIGHEST precision (the precision policy above)."""
  return jnp.matmul(x.astype(jnp.float32), embed, precision=HIGHEST)


def per_row(x: jax.Array, ndim: int) -> jax.Array:
  """x [B] shaped to broadcast over the trailing axes of an array of rank `ndim`."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def stratified_uniform(rng: jax.Array, n: int, part: tuple = (0, 1)) -> jax.Array:
  """n stratified draws on [0, 1), randomly permuted [n]: u_i = (r_i / N + s_i / N) mod 1
  with r_i ~ U[0, 1) independent (one draw in each stratum, as the reference draws them).

  `part` = (index, parts) says which of `parts` equal parts of a batch this is (the
  microbatches of train.grad_accum, each drawing with its own rng): its strata are
  s_i = index + parts * i of N = n * parts, so that the parts together take one draw in
  each stratum of the whole batch, as the reference stratifies its global batch before
  cutting it into parts. (0, 1), the default, is the whole batch: s_i = i, N = n.
  """
  index, parts = part
  rng_r, rng_perm = jax.random.split(rng)
  r = jax.random.uniform(rng_r, (n,))
  total = n * parts
  u = jnp.mod(r / total + (index + parts * jnp.arange(n)) / total, 1.0)
  return jax.random.permutation(rng_perm, u)


def interpolate(noise, data, t):
  """x_t = (1 - t) noise + t data, with t [B] broadcast over the trailing axes."""
  t = per_row(t, noise.ndim)
  return (1 - t) * noise + t * data


def velocity(x, denoised, t, eps: float):
  """b_t(x) = (D_t(x) - x) / (1 - t + eps), t [B]; eps guards t = 1."""
  return (denoised - x) / (1 - per_row(t, x.ndim) + eps)


@jax.custom_vjp
def gram(embed: jax.Array) -> jax.Array:
  """E^T E [D, D] for E [V, D]. Its backward pass is one product, E (G' + G'^T) for the
  cotangent G', where autodiff of the formula makes two (E G' and E G'^T)."""
  return project(embed.T, embed)


def _gram_fwd(embed):
  return gram(embed), embed


def _gram_bwd(embed, g):
  return (project(embed, g + g.T),)


gram.defvjp(_gram_fwd, _gram_bwd)


def noise_factor(embed: jax.Array) -> jax.Array:
  """C [D, D] with C C^T = E^T E, for embed E [V, D] with V > D."""
  return jnp.linalg.cholesky(gram(embed))


def embedded_noise(rng: jax.Array, embed: jax.Array, shape: tuple[int, ...],
                   latent: bool = True, factor: jax.Array | None = None) -> jax.Array:
  """eps @ E [*shape, D] for eps ~ N(0, I_V) [*shape, V].

  Latent (the default when V > D): xi @ C^T with xi ~ N(0, I_D), never building eps;
  `factor` is C when the caller has it already (samplers draw at every step).
  Otherwise (or when V <= D, where E^T E is singular) eps is drawn and projected.
  """
  vocab_size, dim = embed.shape
  if latent and vocab_size > dim:
    xi = jax.random.normal(rng, (*shape, dim), jnp.float32)
    factor = noise_factor(embed) if factor is None else factor
    return project(xi, factor.T)
  return project(jax.random.normal(rng, (*shape, vocab_size), jnp.float32), embed)


EIGEN_RTOL = 1e-5


@jax.named_scope("noise")
def joint_embedded_noise(rng: jax.Array, embeds: tuple[jax.Array, ...],
                         shape: tuple[int, ...], latent: bool = True) -> list[jax.Array]:
  """[eps @ E_1, eps @ E_2, ...] for ONE eps ~ N(0, I_V), as when a teacher and a student
  with different projections read the same noisy input.

  Latent: only eps's coordinates in an orthonormal basis Q [V, k] of the span of all
  the E_i matter, since eps @ E_i = (eps @ Q)(Q^T E_i) and eps @ Q ~ N(0, I_k). Q is
  M W diag(lambda)^(-1/2) for M = [E_1, E_2, ...] and M^T M = W diag(lambda) W^T (an
  eigendecomposition: M^T M is singular whenever the E_i are linearly dependent, as
  when a student starts with its teacher's E); it is never built, and it is held
  constant, so the gradient reaches each E_i as through (Q xi)^T E_i: the V-space
  draw's own gradient with eps replaced by its part in span(Q). The rest of eps is
  independent of every eps @ E_i, so the expected gradient is the V-space draw's.
  """
  if not latent:
    eps = jax.random.normal(rng, (*shape, embeds[0].shape[0]), jnp.float32)
    return [project(eps, e) for e in embeds]
  stacked = jax.lax.stop_gradient(jnp.concatenate(embeds, axis=1))
  eigenvalues, vectors = jnp.linalg.eigh(project(stacked.T, stacked))
  # Directions below float32's resolution of the spectrum are zero in exact arithmetic
  # (e.g. the null space of [E, E]); dividing by their root would amplify rounding.
  keep = eigenvalues > EIGEN_RTOL * eigenvalues[-1]
  basis = jnp.where(keep, vectors / jnp.sqrt(jnp.where(keep, eigenvalues, 1)), 0)
  xi = jax.random.normal(rng, (*shape, stacked.shape[1]), jnp.float32)  # eps @ Q

  def coordinates(e):  # Q^T E_i = basis^T (M^T E_i), differentiable in E_i
    return project(basis.T, project(stacked.T, e))
  return [project(xi, coordinates(e)) for e in embeds]


@jax.named_scope("noise")
def noisy_latent(rng: jax.Array, embed: jax.Array, tokens: jax.Array, t: jax.Array,
                 latent: bool = True) -> jax.Array:
  """h_t = x_t @ E [B, L, D] for tokens [B, L] at times t [B]."""
  return interpolate(embedded_noise(rng, embed, tokens.shape, latent), embed[tokens], t)


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap) in float32 (x itself, as float32, when cap is 0)."""
  return _cap_and_slope(x, cap)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_cross_entropy(logits: jax.Array, tokens: jax.Array, cap: float = 0.0) -> jax.Array:
  """-log softmax(c)[token] = logsumexp(c) - c[token], [B, L] float32, for the capped logits
  c = cap * tanh(logits / cap) (c = logits when cap is 0).

  The backward pass keeps only `logits` and the logsumexp [B, L] and recomputes the cap and
  the softmax from them, where autodiff of the formula would keep several [B, L, V] arrays.
  """
  return _token_cross_entropy_fwd(logits, tokens, cap)[0]


@jax.named_scope("output_head")
def _token_cross_entropy_fwd(logits, tokens, cap):
  capped = soft_cap(logits, cap)
  logsumexp = jax.nn.logsumexp(capped, axis=-1)
  picked = jnp.take_along_axis(capped, tokens[..., None], axis=-1)[..., 0]
  return logsumexp - picked, (logits, tokens, logsumexp)


def _cap_and_slope(logits, cap):
  """(c = cap * tanh(logits / cap), dc/dlogits), float32; (logits, None) when cap is 0."""
  x = logits.astype(jnp.float32)
  if not cap:
    return x, None
  tanh = jnp.tanh(x / cap)
  return cap * tanh, 1 - tanh * tanh


def _capped_softmax(logits, logsumexp, cap):
  """(c = soft_cap(logits), softmax(c), dc/dlogits or None without a cap), [B, L, V]
  float32, recomputed from the raw logits and the forward pass's logsumexp."""
  capped, slope = _cap_and_slope(logits, cap)
  return capped, jnp.exp(capped - logsumexp[..., None]), slope


@jax.named_scope("output_head")
def _token_cross_entropy_bwd(cap, residuals, g):
  logits, tokens, logsumexp = residuals
  _, softmax, slope = _capped_softmax(logits, logsumexp, cap)
  # g (softmax - onehot) first, then the slope: XLA:CPU fuses this order into one pass.
  grad = g[..., None] * (softmax - jax.nn.one_hot(tokens, logits.shape[-1]))
  if slope is not None:
    grad = grad * slope
  return grad.astype(logits.dtype), None


token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)


def _head_logits(features, kernel, bias, dtype):
  """features [N, D] @ kernel [D, V] + bias in `dtype` with float32 accumulation, as the
  model's output layer computes them (float32 [N, V])."""
  logits = jnp.matmul(features.astype(dtype), kernel.astype(dtype),
                      preferred_element_type=jnp.float32)
  return logits + bias.astype(dtype).astype(jnp.float32)


# Traced for a GPU, the fused head and the sampler's argmax pad the output layer to a
# multiple of this many columns: on an H200 the head's products ran twice as fast at
# V 50304 as at 50258; on CPUs the padded steps were slower (docs/performance.md).
GPU_VOCAB_MULTIPLE = 128


def _padded_layer(kernel, bias, dtype, fill: float):
  """(kernel [D, V'] in `dtype`, bias [V'] float32), V' = V, or traced for a GPU the
  multiple of GPU_VOCAB_MULTIPLE at or above V: the new columns zero, their bias `fill`."""
  multiple = GPU_VOCAB_MULTIPLE if sharding.target_platform() == "gpu" else 1
  pad = -kernel.shape[1] % multiple
  return (jnp.pad(kernel.astype(dtype), ((0, 0), (0, pad))),
          jnp.pad(bias.astype(dtype).astype(jnp.float32), (0, pad), constant_values=fill))


def _chunks(chunk: int, features, *per_token):
  """features [B, L, D] and arrays [B, L, ...] -> [L / r, B, r, ...]: chunks of r positions of
  every row, r the largest divisor of L with (rows per device) x r <= chunk (at least 1).
  The chunks split the positions, not the rows, so each device keeps its rows."""
  batch, length = features.shape[:2]
  rows = batch // sharding.row_shards(batch)
  r = max(r for r in range(1, length + 1) if length % r == 0 and (rows * r <= chunk or r == 1))

  def split(a):
    return jnp.moveaxis(a.reshape(batch, length // r, r, *a.shape[2:]), 1, 0)
  return tuple(split(a) for a in (features, *per_token))


def _unchunk(a):
  """[L / r, B, r, ...] -> [B, L, ...], the inverse of _chunks."""
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def head_argmax(features: jax.Array, kernel: jax.Array, bias: jax.Array, dtype,
                chunk: int) -> jax.Array:
  """argmax_v of the logits features @ kernel + bias (as head_cross_entropy computes them),
  int32 [B, L] for features [B, L, D], about `chunk` tokens per device at a time, the
  first index among ties. On CPUs it is top_k with k = 1, which XLA:CPU ran about 1.5x
  faster than argmax on an AMD EPYC, and 2 to 14% slower on a Xeon with AVX-512
  (docs/results.md); elsewhere argmax (XLA:GPU of JAX 0.12 fails to compile top_k in the
  chunks' loop)."""
  kernel, bias = _padded_layer(kernel, bias, dtype, -jnp.inf)
  on_cpu = sharding.target_platform() == "cpu"

  def one(xc):
    logits = _head_logits(xc.reshape(-1, xc.shape[-1]), kernel, bias, dtype)
    index = jax.lax.top_k(logits, 1)[1][:, 0] if on_cpu else jnp.argmax(logits, axis=-1)
    return index.reshape(xc.shape[:2])
  (x,) = _chunks(chunk, features)
  return _unchunk(jax.lax.map(one, x)).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
@jax.named_scope("output_head")
def head_cross_entropy(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                       targets: jax.Array, weights: jax.Array, cap: float, dtype,
                       chunk: int) -> tuple[jax.Array, jax.Array]:
  """The output layer and the cross entropy in one, about `chunk` tokens per device at a
  time: (sum_n weights_n CE_n, CE [B, L]) for features [B, L, D], kernel [D, V], bias [V],
  weights [B, L] and targets either tokens [B, L] (CE_n = token_cross_entropy) or
  probabilities [B, L, V] of any float dtype (CE_n = soft_cross_entropy; they are read in
  float32 a chunk at a time, and get no gradient), of the logits features_n @ kernel + bias
  (in `dtype`, float32 accumulation, capped by `cap`).

  No [B, L, V] array outlives a chunk (a chunk is some positions of every row).
  Differentiated, the forward pass computes the gradients too, chunk by chunk (the weighted
  sum is linear in the weights, which are an input), so the backward pass only scales them:
  no logits are kept or recomputed. The per-token CE is a value, not differentiable:
  weight the tokens through `weights`.
  """
  x, t = _chunks(chunk, features, targets)
  loss = token_cross_entropy if targets.ndim == 2 else soft_cross_entropy

  def one(args):
    xc, tc = args
    return loss(_head_logits(xc, kernel, bias, dtype), tc.astype(jnp.float32)
                if tc.ndim == 3 else tc, cap)
  cross_entropy = _unchunk(jax.lax.map(one, (x, t)))
  return jnp.sum(weights * cross_entropy), cross_entropy


@jax.named_scope("output_head")
def _head_cross_entropy_fwd(features, kernel, bias, targets, weights, cap, dtype, chunk):
  features, kernel, bias, targets, weights = (
      a.value for a in (features, kernel, bias, targets, weights))
  x, t, w = _chunks(chunk, features, targets, weights)
  vocab = kernel.shape[1]
  padded, padded_bias = _padded_layer(kernel, bias, dtype, 0.0)
  kernel_t = padded.T  # [V', D], once
  # XLA:CPU is slow at the reductions over V (exp-and-sum, the bias's column sum) and fast
  # at them as products; XLA:GPU the other way round, and faster without the max's pass.
  gpu = sharding.target_platform() == "gpu"

  def one(sums, args):
    shape = args[2].shape  # [B, r]
    xc, tc, wc = (a.reshape(-1, *a.shape[2:]) for a in args)
    product = jnp.matmul(xc.astype(dtype), padded, preferred_element_type=jnp.float32)
    column = jax.lax.broadcasted_iota(jnp.int32, product.shape, 1)

    def capped_exp(product, top=None):  # (c, dc/dlogits, the shift, exp(c - shift))
      capped, slope = _cap_and_slope(product + padded_bias, cap)
      if top is None:
        # On a GPU, logsumexp shifted by the cap rather than the max when the cap is at
        # most 40: the capped logits lie in [-cap, cap], so exp(c - cap) lies in
        # [exp(-80), 1], normal float32 numbers.
        top = (jnp.full((capped.shape[0], 1), cap) if gpu and 0 < cap <= 40
               else jnp.max(capped, axis=-1, keepdims=True))
      exp = jnp.exp(capped - top)
      if capped.shape[1] > vocab:
        exp = jnp.where(column < vocab, exp, 0.0)
      return capped, slope, top, exp
    capped, slope, top, exp = capped_exp(product)
    total = (jnp.sum(exp, axis=-1) if gpu
             else jnp.matmul(exp, jnp.ones(exp.shape[-1], jnp.float32)))
    logsumexp = top[:, 0] + jnp.log(total)
    if gpu:
      # XLA:GPU would write the tanh of the sum's pass ([chunk, V] float32) for the
      # gradient's pass to read; behind a barrier the gradient's pass recomputes it from
      # the product, which it reads instead.
      product, total, top = jax.lax.optimization_barrier((product, total, top))
      capped, slope, _, exp = capped_exp(product, top)
    softmax = exp / total[:, None]
    if tc.ndim == 1:  # tokens: CE = logsumexp - c[token], dCE/dc = softmax - onehot
      picked = capped.reshape(-1)[jnp.arange(tc.shape[0]) * capped.shape[-1] + tc]
      # a select on the tokens' columns: XLA:CPU is slower at this pass when it subtracts
      # one_hot's array
      grad = jnp.where(column == tc[:, None], softmax - 1, softmax)
    else:  # probabilities p: CE = sum(p) logsumexp - p . c, dCE/dc = sum(p) softmax - p
      target = jnp.pad(tc.astype(jnp.float32), ((0, 0), (0, capped.shape[1] - vocab)))
      mass, picked = jnp.sum(target, axis=-1), jnp.sum(target * capped, axis=-1)
      logsumexp = logsumexp * mass
      grad = softmax * mass[:, None] - target
    grad = wc[:, None] * grad
    if slope is not None:
      grad = grad * slope
    low = grad.astype(dtype)
    if gpu:  # else XLA:GPU writes the float32 gradient, and sums the bias's from it
      low = jax.lax.optimization_barrier(low)
    d_features = jnp.matmul(low, kernel_t, preferred_element_type=jnp.float32)
    if gpu:
      d_kernel, d_bias = sums
      sums = (d_kernel + jnp.matmul(xc.astype(dtype).T, low,
                                    preferred_element_type=jnp.float32),
              d_bias + jnp.sum(low, axis=0, dtype=jnp.float32))
    else:  # the kernel's and the bias's gradient in one product, [x, 1]^T grad
      ones = jnp.ones((xc.shape[0], 1), dtype)
      sums = sums + jnp.matmul(jnp.concatenate([xc.astype(dtype), ones], axis=1).T, low,
                               preferred_element_type=jnp.float32)
    return sums, ((logsumexp - picked).reshape(shape), d_features.reshape(*shape, -1))

  # Off GPUs one carry, the bias's gradient its last row: split in two, XLA planned 2.3 GiB
  # more per chip for the OWT train step on a v5p slice (docs/results.md).
  rows, columns = padded.shape
  zeros = ((jnp.zeros((rows, columns), jnp.float32), jnp.zeros(columns, jnp.float32)) if gpu
           else jnp.zeros((rows + 1, columns), jnp.float32))
  sums, (cross_entropy, d_features) = jax.lax.scan(one, zeros, (x, t, w))
  d_kernel, d_bias = sums if gpu else (sums[:-1], sums[-1])
  d_kernel, d_bias = d_kernel[:, :vocab], d_bias[:vocab]
  cross_entropy = _unchunk(cross_entropy)
  return (jnp.sum(weights * cross_entropy), cross_entropy), (
      _unchunk(d_features), d_kernel.astype(kernel.dtype), d_bias.astype(bias.dtype),
      cross_entropy)


def _head_cross_entropy_bwd(cap, dtype, chunk, residuals, g):
  del cap, dtype, chunk
  d_features, d_kernel, d_bias, cross_entropy = residuals
  g_sum, g_tokens = g
  if not isinstance(g_tokens, jax.custom_derivatives.SymbolicZero):
    raise ValueError("head_cross_entropy's per-token cross entropy is not differentiable; "
                     "weight the tokens through `weights`")
  return (g_sum * d_features, g_sum * d_kernel, g_sum * d_bias, None, g_sum * cross_entropy)


head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd,
                          symbolic_zeros=True)


def flm_loss(denoiser: Callable, embed: jax.Array, tokens: jax.Array, rng: jax.Array,
             schedule, *, given: jax.Array | None = None, latent: bool = True,
             loss_weight: Callable | None = None, cap: float = 0.0,
             head: Callable | None = None, part: tuple = (0, 1)) -> tuple[jax.Array, dict]:
  """The FLM objective: cross entropy of the denoiser at x_t, token-weighted mean.

  tau ~ U[0, 1] stratified over the global batch (of which the tokens are part `part`,
  stratified_uniform), t = t(tau), the network conditioned on tau. The denoiser may
  return raw logits and leave their cap to `cap` (see token_cross_entropy), or, with
  `head`, the output layer's input features [B, L, D] and leave the output layer to
  head(features, tokens, weights) -> (weighted sum, CE) (head_cross_entropy). `given`
  [B, L] marks the given positions of a condition (flmjax/conditioning.py): the denoiser
  gets them clean, E[token] (the caller passes `given` to the model itself, for its
  condition embedding), and the loss leaves them out; without it every token counts.
  `loss_weight(tau) -> w [B]` turns each token's loss into exp(-w) * loss + w.
  """
  rng_tau, rng_noise, rng_dropout = jax.random.split(rng, 3)
  tau = stratified_uniform(rng_tau, tokens.shape[0], part)
  t = schedule.t(tau)
  h = noisy_latent(rng_noise, embed, tokens, t, latent)
  if given is not None:
    h = conditioning.clamp(h, given, embed[tokens])
  out = denoiser(h, tau, rng_dropout)
  mask = (jnp.ones(tokens.shape, jnp.float32) if given is None
          else (~given).astype(jnp.float32))
  count = jnp.maximum(mask.sum(), 1.0)
  weights, offset = mask / count, 0.0
  if loss_weight is not None:
    w = loss_weight(tau)[:, None]
    weights, offset = weights * jnp.exp(-w), jnp.sum(mask * w) / count
  if head is None:
    cross_entropy = token_cross_entropy(out, tokens, cap)
    weighted = jnp.sum(weights * cross_entropy)
  else:
    weighted, cross_entropy = head(out, tokens, weights)
  loss = weighted + offset
  cross_entropy = jnp.sum(jax.lax.stop_gradient(cross_entropy) * mask) / count
  return loss, {"loss": loss, "cross_entropy": cross_entropy}


# --- The flow map (the paper's v2 method) ---------------------------------------------


def flow_map(x, denoised, s, t):
  """X_{s,t}(x) = ((1 - t) / (1 - s)) x + ((t - s) / (1 - s)) delta_{s,t}(x); s, t [B]."""
  s, t = per_row(s, x.ndim), per_row(t, x.ndim)
  one_minus_s = 1 - s + DENOMINATOR_EPS
  return (1 - t) / one_minus_s * x + (t - s) / one_minus_s * denoised


def semigroup_weight(s, u, t):
  """lambda = (1 - t)(u - s) / ((1 - u)(t - s)): delta_{s,t} = lambda delta_{s,u} +
  (1 - lambda) delta_{u,t}(X_{s,u}) for an exact flow map; in [0, 1] for s <= u <= t."""
  return (1 - t) * (u - s) / ((1 - u) * (t - s) + DENOMINATOR_EPS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def soft_cross_entropy(logits: jax.Array, target: jax.Array, cap: float = 0.0) -> jax.Array:
  """-sum_v target[v] log softmax(c)[v], [B, L] float32, for c = soft_cap(logits, cap).

  Like token_cross_entropy, its backward pass recomputes the cap and the softmax from
  `logits` and the logsumexp instead of keeping them.
  """
  return _soft_cross_entropy_fwd(logits, target, cap)[0]


@jax.named_scope("output_head")
def _soft_cross_entropy_fwd(logits, target, cap):
  capped = soft_cap(logits, cap)
  logsumexp = jax.nn.logsumexp(capped, axis=-1)
  value = logsumexp * jnp.sum(target, axis=-1) - jnp.sum(target * capped, axis=-1)
  return value, (logits, target, logsumexp)


@jax.named_scope("output_head")
def _soft_cross_entropy_bwd(cap, residuals, g):
  logits, target, logsumexp = residuals
  capped, softmax, slope = _capped_softmax(logits, logsumexp, cap)
  g = g[..., None]
  grad = g * (softmax * jnp.sum(target, axis=-1, keepdims=True) - target)
  if slope is not None:
    grad = grad * slope
  return grad.astype(logits.dtype), (g * (logsumexp[..., None] - capped)).astype(target.dtype)


soft_cross_entropy.defvjp(_soft_cross_entropy_fwd, _soft_cross_entropy_bwd)


def sparsemax(z: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean projection onto the probability simplex (entmax with alpha = 2)."""
  z = jnp.moveaxis(z, axis, -1)
  z_sorted = -jnp.sort(-z, axis=-1)
  cumulative = jnp.cumsum(z_sorted, axis=-1) - 1
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  support = jnp.sum(z_sorted - cumulative / k > 0, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(cumulative, support - 1, axis=-1) / support
  return jnp.moveaxis(jnp.maximum(z - threshold, 0), -1, axis)
