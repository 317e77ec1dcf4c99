"""Duo's uniform-state discrete diffusion (Duo, Sahoo et al., 2025; docs/baselines.md): the
`duo_base` model, trained on discrete states after Duo's Gaussian curriculum (`objective`
and the section below), and Duo's discrete consistency distillation (DCD, the last section).

Time, schedule and training times are flmjax/absorbing.py's (t = 1 noise, alpha_t =
1 - (1 - 1e-3) t, the network's time input sigma_t = -log alpha_t). Forward process: each
token is kept with probability alpha_t, else replaced by an id drawn uniformly from all V
(x0 again possible); the prior is uniform over V. The network reads token ids and gives
x_theta = softmax(f) over all V.

Loss per position (the continuous-time bound; Duo's DUO_BASE in the reference's algo.py
writes it with xb_theta = V A x_theta + 1 - A): with A = alpha_t, j = x_t, rho = V A / (1 - A),
l(v) = log(1 + rho x_theta(v)) and u(v) = log(c + (1 - c) x_theta(v)), c = 1 / (1 + rho),

  T1 = (rho / A) (1[x0 = j] c + 1[x0 != j] - e^{-l(j)}),
  T2 = -(sum_{v != j} l(v) - (V - 1) u(j)) / (1 + rho)             if x0 = j,
  T2 = -(1 + rho) u(x0) + (rho + V) l(j) - sum_{v != x0} l(v)      if x0 != j,
  loss = (alpha'_t / (V A)) (T1 - T2),  alpha'_t = -(1 - 1e-3) (log-linear; `bound`
  takes any schedule's A, 1 - A and alpha'_t).

This is that expression rearranged so that its terms of size rho log rho (about
1e9 at t = 1e-3 and V = 50258) cancel in closed form rather than in float32; it is the
limit of KL(q(x_s | x_t, x0) || q(x_s | x_t, x0 = x_theta)) / (t - s) as s -> t, 0 when
x_theta is x0's one-hot. It is also the validation bound on the NLL per token (no prior
term; the integral starts at t = 1e-3).

Sampling (one compiled scan, `tokens`): from uniform ids at t = 1 along t_i = linspace(1,
1e-5, k + 1), every position is redrawn at each step t -> s from the posterior with x0
replaced by x_theta(x_t, sigma_t):

  q(v) ~ (r [v = j] + (1 - r) / V) (a_s x_theta(v) + (1 - a_s) / V),  r = a_t / a_s,

then one noise-removal call at t = 1e-5: `ancestral` takes the same step to a_s = 1,
`greedy` the argmax of x_theta; k + 1 network calls. Temperature and nucleus (top-p) apply
to q (sampling.nucleus; the reference's Duo top-p hands log-probabilities to the sampler, a
bug of the reference, docs/baselines.md).
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
from jax.scipy import special
import ml_collections
import numpy as np

from flmjax import absorbing, sampling, schedule, sharding
from flmjax.absorbing import EPS, LAST_TIME, alpha, sigma
from flmjax.errors import UsageError
from flmjax.flow import HIGHEST


def corrupt(rng: jax.Array, x0: jax.Array, t: jax.Array, vocab_size: int) -> jax.Array:
  """x_t: each token of x0 [B, L] kept with probability alpha_t [B], else an id drawn
  uniformly from all `vocab_size`."""
  rng_keep, rng_id = jax.random.split(rng)
  kept = jax.random.uniform(rng_keep, x0.shape) < alpha(t)[:, None]
  return jnp.where(kept, x0, jax.random.randint(rng_id, x0.shape, 0, vocab_size))


def bound(logits, xt, x0, alpha_t, log_noised, dalpha) -> jax.Array:
  """The continuous-time bound at every position [B, L] (module docstring) of a schedule
  at alpha_t = A [B], log(1 - A) [B] and alpha'_t [B]; logits [B, L, V] float32."""
  vocab = logits.shape[-1]
  a = alpha_t[:, None]
  log_rho = jnp.log(vocab * a) - log_noised[:, None]  # rho = V A / (1 - A)
  log1p_rho = jnp.logaddexp(0.0, log_rho)
  log_x = jax.nn.log_softmax(logits, axis=-1)
  ell = jax.nn.softplus(log_rho[..., None] + log_x)  # l(v) = log(1 + rho x(v))

  def at(values, ids):
    return jnp.take_along_axis(values, ids[..., None], -1)[..., 0]

  def u(log_x):  # log(c + (1 - c) x): log1p((1 - c)(x - 1)) near x = 1, else a logaddexp
    near = log_x > -0.5  # (the other branch's input kept in range: its gradient is taken)
    near_one = jnp.log1p(jnp.exp(log_rho - log1p_rho) * jnp.expm1(jnp.where(near, log_x, 0.0)))
    return jnp.where(near, near_one, jnp.logaddexp(-log1p_rho, log_rho - log1p_rho + log_x))

  rho, c = jnp.exp(log_rho), jnp.exp(-log1p_rho)
  ell_j, log_x_j, log_x_0 = at(ell, xt), at(log_x, xt), at(log_x, x0)
  # sum over v != x0 of l(v), without the large l(x0) of a confident x_theta
  others = jnp.where(jnp.arange(vocab) == x0[..., None], 0.0, ell).sum(-1)
  same = x0 == xt
  t1 = rho / a * (jnp.where(same, c, 1.0) - jnp.exp(-ell_j))
  t2 = jnp.where(same, -(others - (vocab - 1) * u(log_x_j)) * c,
                 -(1 + rho) * u(log_x_0) + (rho + vocab) * ell_j - others)
  return dalpha[:, None] / (vocab * a) * (t1 - t2)


def log_linear(t) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(alpha_t, log(1 - alpha_t), alpha'_t) [B] of the log-linear schedule at times t [B]:
  1 - alpha_t = (1 - eps) t, alpha'_t = -(1 - eps); the arguments of `bound`."""
  return alpha(t), jnp.log((1 - EPS) * t), jnp.full_like(t, -(1 - EPS))


# --- Samplers ---------------------------------------------------------------------------


def grid(steps: int) -> dict[str, np.ndarray]:
  """Host float64 rows of the k steps and the noise-removal call [k + 1]: the noise level
  the network sees (sigma_t), alpha at t and at the next time (1 for the last call)."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  alpha_t = alpha(np.linspace(1.0, LAST_TIME, steps + 1))
  return {"sigma": -np.log(alpha_t), "alpha_t": alpha_t,
          "alpha_s": np.append(alpha_t[1:], 1.0), "last": np.arange(steps + 1) == steps}


def posterior(probs: jax.Array, x: jax.Array, alpha_t, alpha_s) -> jax.Array:
  """q(x_s | x_t = x, x0 ~ probs) [B, L, V] of the uniform process (module docstring)."""
  vocab = probs.shape[-1]
  r = alpha_t / alpha_s
  toward = alpha_s * probs + (1 - alpha_s) / vocab
  weights = (1 - r) / vocab * toward + r * jax.nn.one_hot(x, vocab) * toward
  return weights / weights.sum(-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "batch_size", "seq_len", "greedy", "temperature", "top_p", "mesh"))
def tokens(graphdef, params, rng, rows, *, batch_size: int, seq_len: int,
           greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           mesh=None) -> tuple[jax.Array, jax.Array]:
  """(tokens [B, L] int32, network calls) of a Duo sample over `rows` (`grid`); `greedy`
  takes the argmax of x_theta at the noise-removal call."""
  model = nnx.merge(graphdef, params)
  rows = sampling.device_rows(rows)

  def body(x, inputs):
    row, key = inputs
    probs = jax.nn.softmax(model(model.embed_ids(x), jnp.full(x.shape[:1], row["sigma"])),
                           axis=-1)
    step = sampling.nucleus(posterior(probs, x, row["alpha_t"], row["alpha_s"]),
                            temperature, top_p)
    new = sampling.categorical(key, step)
    if greedy:
      new = jnp.where(row["last"], jnp.argmax(probs, axis=-1), new)
    return new, None

  rng_prior, rng_steps = jax.random.split(rng)
  x = jax.random.randint(rng_prior, (batch_size, seq_len), 0, model.vocab_size, jnp.int32)
  keys = jax.random.split(rng_steps, len(rows["sigma"]))
  with sharding.tracing_under(mesh):
    x, _ = jax.lax.scan(body, x, (rows, keys))
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(x, sharding.replicated(mesh))
  return x, jnp.int32(len(rows["sigma"]))


def sampler(greedy: bool = False):
  """A Duo sampler factory (see sampling.Options): noise removal ancestral or greedy."""
  def make(steps: int, num_samples: int, seq_len: int, options: sampling.Options):
    rows = grid(steps)

    def sample(graphdef, params, rng):
      return tokens(graphdef, params, rng, rows, batch_size=num_samples, seq_len=seq_len,
                    greedy=greedy, temperature=options.temperature, top_p=options.top_p,
                    mesh=sampling.params_mesh(params))
    return sample
  return make


# --- Duo's Gaussian view (its curriculum and DCD, docs/baselines.md) ----------------------
#
# z = a(g) onehot(x0) + b(g) eps, eps ~ N(0, I_V), a(g) = sqrt(sigmoid(-g)), b(g) =
# sqrt(sigmoid(g)) (g is -log SNR); x = argmax z is a uniform-process state with alpha(g) =
# (V P(g) - 1) / (V - 1), P(g) the probability that the clean id is the argmax. Duo's
# curriculum trains on (argmax z, the relaxed input softmax(z / tau) @ E); its distillation
# (DCD) on the argmax at two g of one eps.

GAUSSIAN_NODES = 200  # of the Gauss-Hermite quadrature of alpha(g), as Duo's tables
SIGMA_TABLE = 4097  # points of the tables of alpha(g) that the objectives interpolate


def gaussian_alpha(g, vocab_size: int, ids: int | None = None) -> np.ndarray:
  """alpha(g) = (V P(g) - 1) / (V - 1) of the argmax state, in float64 on the host, with
  P(g) = E_{y ~ N(mu, 1)} Phi(y)^(ids - 1), mu = e^{-g/2}, the probability that the clean
  id is the argmax over `ids` ids (default V, the argmax that flmjax draws; Duo's GPT-2
  table takes 50257 for V = 50258), by 200-node Gauss-Hermite quadrature
  (schedule.argmax_probability)."""
  mu = np.exp(-np.asarray(g, np.float64) / 2)
  probability = schedule.argmax_probability(mu, ids or vocab_size, GAUSSIAN_NODES)
  return (vocab_size * probability - 1) / (vocab_size - 1)


def gaussian_slope(g, vocab_size: int) -> np.ndarray:
  """d alpha / d g = V / (V - 1) dP/dg, dP/dg = -(mu / 2) E[(y - mu) Phi(y)^(V - 1)] (d mu /
  d g = -mu / 2, and d/d mu E_{N(mu, 1)} f = E[(y - mu) f]), by the same quadrature: the
  analytic form of the reference's forward difference (docs/baselines.md)."""
  mu = np.exp(-np.asarray(g, np.float64) / 2)
  return vocab_size / (vocab_size - 1) * -mu / 2 * schedule.argmax_probability(
      mu, vocab_size, GAUSSIAN_NODES, weight=lambda z: z)


def gaussian_table(gamma_min: float, gamma_max: float, vocab_size: int):
  """g [B] -> (-log alpha(g), d alpha / d g) [B], interpolated in float64 tables of
  SIGMA_TABLE points over [gamma_min, gamma_max] (float32 quadrature would be off by up
  to 4e-5 in alpha)."""
  grid = np.linspace(gamma_min, gamma_max, SIGMA_TABLE)
  sigma = -np.log(gaussian_alpha(grid, vocab_size))
  slope = gaussian_slope(grid, vocab_size)
  grid, sigma, slope = (x.astype(np.float32) for x in (grid, sigma, slope))
  return lambda g: (jnp.interp(g, grid, sigma), jnp.interp(g, grid, slope))


# Relaxed input of the curriculum, in chunks of ids so that no [B, L, V] array is held:
# eps of the ids [NOISE_BLOCK k, NOISE_BLOCK (k + 1)) is normal(fold_in(rng, k)), whatever
# the chunk, so the draw does not depend on the chunking (nor on the mesh).
NOISE_BLOCK = 128
RELAXED_CHUNK_BYTES = 128 * 2**20  # float32 weights of one chunk, per device


def relaxed_blocks(x0_shape: tuple[int, int], vocab_size: int) -> int:
  """Noise blocks per chunk of `relaxed_input`: the most whose float32 weights [B, L,
  ids] fit in RELAXED_CHUNK_BYTES on each device (at least one, at most all)."""
  tokens = x0_shape[0] // sharding.row_shards(x0_shape[0]) * x0_shape[1]
  return int(np.clip(RELAXED_CHUNK_BYTES // (4 * tokens * NOISE_BLOCK), 1,
                     -(-vocab_size // NOISE_BLOCK)))


def _relaxed_chunk(rng, x0, g, inv_tau, index, blocks: int, vocab_size: int):
  """z / tau of chunk `index` [blocks, B, L, NOISE_BLOCK] (ids past V at -inf) and its
  ids [blocks, NOISE_BLOCK]."""
  first = index * blocks + jnp.arange(blocks)
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(rng, k),
                                             (*x0.shape, NOISE_BLOCK)))(first)
  ids = first[:, None] * NOISE_BLOCK + jnp.arange(NOISE_BLOCK)
  g = g[None, :, None, None]
  z = jnp.sqrt(jax.nn.sigmoid(g)) * eps + jnp.sqrt(jax.nn.sigmoid(-g)) * (
      ids[:, None, None, :] == x0[None, :, :, None])
  return jnp.where(ids[:, None, None, :] < vocab_size, z * inv_tau, -jnp.inf), ids


def _embed_chunks(embed, blocks: int):
  """E [V, D] zero-padded and split [chunks, blocks, NOISE_BLOCK, D]."""
  vocab, dim = embed.shape
  per = blocks * NOISE_BLOCK
  chunks = -(-vocab // per)
  return jnp.pad(embed, ((0, chunks * per - vocab), (0, 0))).reshape(
      chunks, blocks, NOISE_BLOCK, dim)


def _relaxed_forward(embed, rng, x0, g, inv_tau, blocks):
  """(h, argmax z, max z / tau, sum_v e^{z_v / tau - max}) in one pass over the chunks,
  the softmax kept online (running max, sum and weighted sum of rows of E)."""
  vocab = embed.shape[0]
  shape = x0.shape

  def body(carry, inputs):
    top, total, acc, arg = carry
    index, rows = inputs
    logits, ids = _relaxed_chunk(rng, x0, g, inv_tau, index, blocks, vocab)
    block_top = logits.max(-1)  # [blocks, B, L]
    best = block_top.argmax(0)
    chunk_top = block_top.max(0)
    chunk_arg = jnp.take_along_axis(ids[:, 0][:, None, None] + logits.argmax(-1),
                                    best[None], 0)[0]
    new_top = jnp.maximum(top, chunk_top)
    weights = jnp.exp(logits - new_top[None, ..., None])
    scale = jnp.exp(top - new_top)
    total = total * scale + weights.sum((0, 3))
    acc = acc * scale[..., None] + jnp.einsum("kblc,kcd->bld", weights, rows,
                                              precision=HIGHEST)
    return (new_top, total, acc, jnp.where(chunk_top > top, chunk_arg, arg)), None

  chunks = _embed_chunks(embed, blocks)
  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, embed.shape[1])),
          jnp.zeros(shape, jnp.int32))
  (top, total, acc, arg), _ = jax.lax.scan(body, init, (jnp.arange(len(chunks)), chunks))
  return acc / total[..., None], arg, top, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def relaxed_input(embed, rng, x0, g, inv_tau, blocks: int):
  """(softmax(z / tau) @ E [B, L, D] float32, argmax_v z_v [B, L]) for z = a(g) onehot(x0)
  + b(g) eps of one eps ~ N(0, I_V) per position (g [B], inv_tau = 1 / tau a scalar), in
  chunks of `blocks` noise blocks (relaxed_blocks), never holding [B, L, V]. Differentiable
  in E only (the curriculum's z does not depend on the parameters): its backward pass
  draws each chunk's eps again."""
  h, arg, _, _ = _relaxed_forward(embed, rng, x0, g, inv_tau, blocks)
  return h, arg


def _relaxed_fwd(embed, rng, x0, g, inv_tau, blocks):
  h, arg, top, total = _relaxed_forward(embed, rng, x0, g, inv_tau, blocks)
  return (h, arg), (embed, rng, x0, g, inv_tau, top, total)


def _relaxed_bwd(blocks, residuals, cotangents):
  embed, rng, x0, g, inv_tau, top, total = residuals
  dh = cotangents[0]

  def rows(_, index):  # dE of the chunk's ids = softmax weights^T dh
    logits, _ = _relaxed_chunk(rng, x0, g, inv_tau, index, blocks, embed.shape[0])
    weights = jnp.exp(logits - top[None, ..., None]) / total[None, ..., None]
    return None, jnp.einsum("kblc,bld->kcd", weights, dh, precision=HIGHEST)

  chunks = _embed_chunks(embed, blocks).shape[0]
  _, grads = jax.lax.scan(rows, None, jnp.arange(chunks))
  return grads.reshape(-1, embed.shape[1])[:embed.shape[0]], None, None, None, None


relaxed_input.defvjp(_relaxed_fwd, _relaxed_bwd)


def trajectory(rng: jax.Array, x0: jax.Array, gammas, vocab_size: int) -> list[jax.Array]:
  """[argmax_v (a(g) onehot(x0) + b(g) eps)_v [B, L] for g in `gammas` (each [B])], one eps
  ~ N(0, I_V) per position shared by all, drawn without eps: the other ids' z are b(g)
  eps_v, so their argmax is one uniform id other than x0 at every g, and x0 wins when
  e^{-g/2} = a / b exceeds the gap M - eps_x0, M the maximum of V - 1 standard normals,
  -Phi^{-1}(1 - U^{1/(V - 1)}), U ~ U(0, 1)."""
  rng_clean, rng_top, rng_id = jax.random.split(rng, 3)
  clean = jax.random.normal(rng_clean, x0.shape)
  u = jax.random.uniform(rng_top, x0.shape, minval=jnp.finfo(jnp.float32).tiny)
  top = -special.ndtri(-jnp.expm1(jnp.log(u) / (vocab_size - 1)))
  other = jax.random.randint(rng_id, x0.shape, 0, vocab_size - 1)
  other = other + (other >= x0)  # uniform over the ids other than x0
  return [jnp.where(top - clean < jnp.exp(-g / 2)[:, None], x0, other) for g in gammas]


# --- Duo's Gaussian curriculum (docs/baselines.md) -----------------------------------------


def inverse_tau(step: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """1 / tau at optimizer step `step`: log10 tau is tau_log10_start before
  curriculum_start, then linear to tau_log10_end at curriculum_end."""
  span = max(cfg.curriculum_end - cfg.curriculum_start, 1)
  frac = jnp.clip((step - cfg.curriculum_start) / span, 0.0, 1.0)
  return 10.0 ** -(cfg.tau_log10_start + frac * (cfg.tau_log10_end - cfg.tau_log10_start))


def objective(config: ml_collections.ConfigDict, vocab_size: int, teacher_graphdef=None, *,
              train: bool = True):
  """Duo's training objective, the token-weighted mean of `bound` at stratified times t
  (absorbing.training_times), with dropout only when training: on discrete states
  (`duo_base`: x_t = corrupt(x0, t), the network on E[x_t] at sigma_t, the log-linear
  schedule), after Duo's Gaussian curriculum for the first duo.curriculum_end steps
  (0: none; validation is always on discrete states). In the curriculum, at g =
  gamma_min + t (gamma_max - gamma_min), the network reads softmax(z / tau) @ E
  (relaxed_input; the original Duo's softmax, which the reference drops: a bug of the
  reference, docs/baselines.md) at sigma = -log alpha(g),
  and the bound is taken at x_t = argmax z with alpha(g) and alpha'_t = (gamma_max -
  gamma_min) d alpha / d g. The curriculum's last step is curriculum_end - 1 (the
  reference also runs it at curriculum_end). The step, frozen["step"] (state.train_step),
  picks the network's input and schedule by a lax.cond; the network and the loss lie
  outside it, as the residuals of a differentiated cond are those of both branches."""
  del teacher_graphdef
  curriculum = train and config.duo.curriculum_end
  if curriculum:
    cfg = config.duo
    ends = gaussian_alpha(np.array([cfg.gamma_min, cfg.gamma_max]), vocab_size)
    if not 0 < ends[1] <= ends[0] < 1:  # log(1 - alpha) and log(alpha) finite
      raise UsageError(
          f"duo.gamma_min={cfg.gamma_min}, duo.gamma_max={cfg.gamma_max}: at V={vocab_size} "
          f"alpha(g) is {ends[0]} and {ends[1]} there; the curriculum's bound needs alpha "
          "strictly between 0 and 1 (the clean id neither always nor never the argmax): "
          "move the range toward Duo's (-3.55 to -1.85).")
    table = gaussian_table(cfg.gamma_min, cfg.gamma_max, vocab_size)
    span = cfg.gamma_max - cfg.gamma_min

  def loss_fn(model, batch, rng, frozen, part=(0, 1)):
    x0 = batch["tokens"]
    rng_t, rng_noise, rng_dropout = jax.random.split(rng, 3)
    t = absorbing.training_times(rng_t, x0.shape[0], part)

    def discrete():
      xt = corrupt(rng_noise, x0, t, vocab_size)
      return (model.embed_ids(xt), xt, sigma(t)) + log_linear(t)

    def relaxed():
      g = cfg.gamma_min + t * span
      sigma_g, slope = table(g)
      h, xt = relaxed_input(model.vocab_embed[...], rng_noise, x0, g,
                            inverse_tau(frozen["step"], cfg),
                            relaxed_blocks(x0.shape, vocab_size))
      return h, xt, sigma_g, jnp.exp(-sigma_g), jnp.log(-jnp.expm1(-sigma_g)), span * slope

    h, xt, time_input, *rates = (
        jax.lax.cond(frozen["step"] < cfg.curriculum_end, relaxed, discrete)
        if curriculum else discrete())
    logits = model(h, time_input, dropout_rng=rng_dropout if train else None)
    loss = bound(logits, xt, x0, *rates).mean()
    return loss, {"loss": loss, "noised": (xt != x0).mean()}
  return loss_fn


# --- Discrete consistency distillation (DCD, docs/baselines.md) --------------------------
#
# The student at (argmax z_t, g_t) is trained toward a frozen teacher at (argmax z_s, g_s)
# on the same eps, a step dt = 2^k / T closer to the data, k the round
# (distill.dcd.round_steps steps each; the teacher is the student as it was when its round
# began).


def dcd_step(step: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """dt = 2^k / T at optimizer step `step`, k = step // round_steps."""
  return 2.0 ** (step // cfg.round_steps) / cfg.grid


def dcd_objective(config: ml_collections.ConfigDict, vocab_size: int, teacher_graphdef=None,
                  *, train: bool = True):
  """The DCD loss (model, batch, rng, frozen) -> (loss, metrics), `frozen` the round's
  teacher {"params", "step"}: times t ~ training_times, t <- min(t + dt, 1), s = t - dt,
  g = gamma_min + t (gamma_max - gamma_min); the student's log x_S at (x_t, sigma =
  -log alpha(g_t)), the teacher's log x_T at (x_s, -log alpha(g_s)) without gradient or
  dropout; per position kl-bwd sum_v x_S (log x_S - log x_T) or kl-fwd sum_v x_T (log x_T
  - log x_S), averaged over the batch's tokens."""
  del teacher_graphdef  # the teacher is the student's graph
  cfg = config.distill.dcd
  table = gaussian_table(cfg.gamma_min, cfg.gamma_max, vocab_size)

  def time_input(g):
    return table(g)[0]

  def gamma(t):
    return cfg.gamma_min + t * (cfg.gamma_max - cfg.gamma_min)

  def loss_fn(student, batch, rng, frozen, part=(0, 1)):
    x0 = batch["tokens"]
    rng_t, rng_z, rng_dropout = jax.random.split(rng, 3)
    dt = dcd_step(frozen["step"], cfg)
    t = jnp.minimum(absorbing.training_times(rng_t, x0.shape[0], part) + dt, 1.0)
    g_t, g_s = gamma(t), gamma(t - dt)
    x_t, x_s = trajectory(rng_z, x0, (g_t, g_s), vocab_size)
    teacher = nnx.merge(nnx.graphdef(student), frozen["params"])
    log_teacher = jax.lax.stop_gradient(jax.nn.log_softmax(
        teacher(teacher.embed_ids(x_s), time_input(g_s)), axis=-1))
    log_student = jax.nn.log_softmax(student(
        student.embed_ids(x_t), time_input(g_t), dropout_rng=rng_dropout if train else None),
        axis=-1)
    if cfg.divergence == "kl-bwd":
      kl = jnp.sum(jnp.exp(log_student) * (log_student - log_teacher), -1)
    else:
      kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), -1)
    loss = kl.mean()
    return loss, {"loss": loss, "dt": dt, "noised": (x_t != x0).mean()}
  return loss_fn
