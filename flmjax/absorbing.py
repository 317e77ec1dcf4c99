"""The absorbing-state discrete diffusion baselines: MDLM (Sahoo et al., 2024), SEDD (Lou
et al., 2024) and D3PM (Austin et al., 2021), as the reference has them (docs/baselines.md).

Time runs the other way from FLM's: t = 1 is pure noise, t = 0 data. Each token is
independently replaced by the mask id m with probability 1 - alpha_t, with the log-linear
schedule alpha_t = 1 - (1 - 1e-3) t and sigma_t = -log alpha_t. The network reads token
ids (rows of E) and its time input is sigma: 0 for MDLM (no time conditioning), sigma_t
for SEDD and D3PM.

- MDLM: SUBS parameterisation (the mask logit removed, clean positions copied); loss
  -alpha'_t / (1 - alpha_t) log p(x0 | x_t) = (1 / t) x cross entropy at masked positions.
- SEDD: log score log s_v = f_v - log(e^sigma - 1) - log(V - 1) (s_v estimates
  p_t(v) / p_t(m) at a masked position); denoising score entropy
  sigma'(t) [sum_{v != m} s_v - q log s_{x0} + q (log q - 1)], q = 1 / (e^sigma - 1), at
  masked positions.
- D3PM (absorbing, T = 1000 discrete steps): p_theta = softmax(f) over all V (the mask
  keeps its mass); times snapped to the grid (d3pm_time); loss T KL(q(x_s | x_t, x0) ||
  p_theta(x_s | x_t)) at masked positions (d3pm_token_loss) plus the reconstruction
  -log p_theta(x0 | x0) of a second pass on the clean sequence at sigma = 0, at every
  position.

The losses are token-weighted means over the batch and are also the validation bound on
the negative log likelihood per token (no prior term; the integral starts at t = 1e-3; for
D3PM the discrete-time bound with the reconstruction read off the clean sequence, as the
reference does).

Sampling (one compiled scan, `tokens`): from all-mask at t = 1 along
t_i = linspace(1, 1e-5, k + 1), then one noise-removal call at t = 1e-5, so k + 1 network
calls. At a masked position a step unmasks with probability u and draws the token from a
distribution pi over real tokens, which is the reference's categorical draw over
{real tokens, m} factored in two (the same distribution; it avoids drawing between
weights of very different sizes in float32):
- MDLM `ancestral`: pi = p_theta, u = (alpha_s - alpha_t) / (1 - alpha_t); the
  noise-removal step has u = 1. `ancestral_cache` reuses p_theta when no token of the batch
  changed in the last step (exact, since MDLM ignores time); its call count is 1 + the
  steps that changed a token.
- SEDD `analytic` (Tweedie): pi = s / sum s over real tokens, u = (e^d - 1) sum_{v != m} s_v
  with d = sigma_t - sigma_s; the final denoiser has u = 1.
- D3PM `ancestral`: the reference's MDLM step with D3PM's p_theta (_d3pm_step).
Temperature and nucleus (top-p) apply to pi (sampling.nucleus).
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flmjax import flow, sampling, sharding

EPS = 1e-3  # the schedule's alpha_1 and the smallest training time (both 1e-3)
LAST_TIME = 1e-5  # where the samplers' grid ends
SUPPRESSED = -1e6  # a logit that removes its token


def alpha(t):
  """alpha_t = 1 - (1 - eps) t: the probability that a token is still clean."""
  return 1 - (1 - EPS) * t


def sigma(t):
  """sigma_t = -log alpha_t."""
  return -jnp.log1p(-(1 - EPS) * t)


def training_times(rng: jax.Array, n: int, part: tuple = (0, 1)) -> jax.Array:
  """t_i = eps + (1 - eps) u_i [n] for FLM's stratified, permuted u (flow.stratified_uniform:
  u_i = (r_i + i) / n, r_i ~ U[0, 1) independent, over the global batch of which this is
  part `part`)."""
  return EPS + (1 - EPS) * flow.stratified_uniform(rng, n, part)


def mask_tokens(rng: jax.Array, x0: jax.Array, t: jax.Array, mask_id: int) -> jax.Array:
  """x_t: each token of x0 [B, L] replaced by mask_id with probability 1 - alpha_t [B]."""
  masked = jax.random.uniform(rng, x0.shape) < 1 - alpha(t)[:, None]
  return jnp.where(masked, mask_id, x0)


def subs_log_probs(logits: jax.Array, mask_id: int) -> jax.Array:
  """MDLM's log p_theta [B, L, V] over real tokens: the mask logit removed, normalised.
  (SUBS's carry-over of clean positions is applied where it matters: the loss counts
  masked positions only, and the sampler never changes a clean one.)"""
  return jax.nn.log_softmax(logits.at[..., mask_id].set(SUPPRESSED), axis=-1)


def mdlm_token_loss(logits, xt, x0, t, mask_id: int) -> jax.Array:
  """-alpha'_t / (1 - alpha_t) log p_theta(x0 | x_t) at masked positions, 0 elsewhere
  [B, L]; logits [B, L, V] float32, t [B]."""
  log_p = jnp.take_along_axis(subs_log_probs(logits, mask_id), x0[..., None], -1)[..., 0]
  weight = (1 - EPS) / (1 - alpha(t))  # -alpha'_t / (1 - alpha_t)
  return jnp.where(xt == mask_id, -weight[:, None] * log_p, 0.0)


def sedd_log_score(logits, sigma_t, vocab_size: int):
  """log s [B, L, V] = f - log(e^sigma - 1) - log(V - 1) (before the entry at x_t,
  which SEDD sets to 0, so that its masked-position entry m drops out of every sum)."""
  return logits - jnp.log(jnp.expm1(sigma_t))[:, None, None] - np.log(vocab_size - 1)


def sedd_token_loss(logits, xt, x0, t, mask_id: int) -> jax.Array:
  """Denoising score entropy at masked positions, 0 elsewhere [B, L]."""
  sigma_t = sigma(t)
  log_score = sedd_log_score(logits, sigma_t, logits.shape[-1])
  real = log_score.at[..., mask_id].set(-jnp.inf)
  positive = jnp.exp(jax.nn.logsumexp(real, axis=-1))  # sum over v != m of s_v
  # At a masked position x_t = m, whose score entry is set to 1: text whose clean token is
  # the mask id (GPT-2 text spelling [PAD], BERT text spelling [MASK]) scores log 1 = 0.
  log_s_x0 = jnp.where(x0 == mask_id, 0.0,
                       jnp.take_along_axis(log_score, x0[..., None], -1)[..., 0])
  q = (1 / jnp.expm1(sigma_t))[:, None]
  dsigma = ((1 - EPS) / alpha(t))[:, None]  # sigma'(t) = -alpha'_t / alpha_t
  entropy = positive - q * log_s_x0 + q * (jnp.log(q) - 1)
  return jnp.where(xt == mask_id, dsigma * entropy, 0.0)


D3PM_STEPS = 1000  # T, D3PM's number of discrete time steps


def d3pm_time(t):
  """t snapped to D3PM's grid: (floor(T t) + 1) / T, so training times in [1/T, 1) give
  2/T, ..., 1 (at most 1: float32 can round a training time up to 1)."""
  return jnp.minimum((jnp.floor(D3PM_STEPS * t) + 1) / D3PM_STEPS, 1.0)


def d3pm_token_loss(logits, xt, x0, t, mask_id: int) -> jax.Array:
  """D3PM's diffusion term at masked positions, 0 elsewhere [B, L]: T KL(q(x_s | x_t, x0)
  || p_theta(x_s | x_t)) for the step s -> t that raises the masking probability
  u = 1 - alpha_t (at most 1 - 1e-4) by h = 1 / T, with p_theta(x_s | x_t) proportional
  to q(x_t | x_s) sum_v p(v) q(x_s | x0 = v), p = softmax(f) over all V (its mask entry
  q_m included); with a_t = 1 - u, a_s = 1 - (u - h) (the reference writes u - h: a bug
  of the reference, docs/baselines.md):

    (h / u) [log(1 + a_t q_m / u) - log p(x0)]
      + (1 - h / u) [log(1 + a_t q_m / u) - log(1 + a_s q_m / (u - h))]."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  u = jnp.minimum((1 - EPS) * t, 1 - 1e-4)[:, None]  # 1 - alpha_t, without cancellation
  h = 1 / D3PM_STEPS
  q_m = jnp.exp(log_p[..., mask_id])
  log_p0 = jnp.take_along_axis(log_p, x0[..., None], -1)[..., 0]
  masked = jnp.log1p((1 - u) * q_m / u)
  kl = h / u * (masked - log_p0) + (1 - h / u) * (
      masked - jnp.log1p((1 - u + h) * q_m / (u - h)))
  return jnp.where(xt == mask_id, D3PM_STEPS * kl, 0.0)


def objective(token_loss, time_input, times=lambda t: t, reconstruction=False):
  """The training objective (objectives.Objective.build) of an absorbing family: x_t =
  mask_tokens(x0) at times t = times(stratified times), the network on
  E[x_t] at time_input(t), the token-weighted mean of token_loss(logits, x_t, x0, t,
  mask_id) (plus, with `reconstruction`, -log p_theta(x0 | x0) of a second pass on the
  clean sequence at sigma = 0, at every position), with dropout only when training; it
  also reports the share of noised tokens."""
  def build(config: ml_collections.ConfigDict, vocab_size: int, teacher_graphdef=None, *,
            train: bool = True):
    del teacher_graphdef, vocab_size
    mask_id = config.model.mask_id

    def loss_fn(model, batch, rng, frozen, part=(0, 1)):
      del frozen
      x0 = batch["tokens"]
      rng_t, rng_noise, rng_dropout = jax.random.split(rng, 3)
      t = times(training_times(rng_t, x0.shape[0], part))
      xt = mask_tokens(rng_noise, x0, t, mask_id)
      logits = model(model.embed_ids(xt), time_input(t),
                     dropout_rng=rng_dropout if train else None)
      per_token = token_loss(logits, xt, x0, t, mask_id)
      if reconstruction:
        clean = model(model.embed_ids(x0), jnp.zeros_like(t),
                      dropout_rng=jax.random.fold_in(rng_dropout, 1) if train else None)
        per_token -= jnp.take_along_axis(jax.nn.log_softmax(clean, axis=-1), x0[..., None],
                                         -1)[..., 0]
      loss = per_token.mean()
      return loss, {"loss": loss, "noised": (xt != x0).mean()}
    return loss_fn
  return build


mdlm_objective = objective(mdlm_token_loss, jnp.zeros_like)  # no time input
sedd_objective = objective(sedd_token_loss, sigma)
d3pm_objective = objective(d3pm_token_loss, sigma, times=d3pm_time, reconstruction=True)


# --- Samplers ---------------------------------------------------------------------------


def grid(steps: int) -> dict[str, np.ndarray]:
  """Host float64 rows of the k steps and the noise-removal call [k + 1]: the noise level
  the network sees (sigma_t), MDLM's unmasking probability u, SEDD's d, and D3PM's
  alpha_s - alpha_t and 1 - alpha_s (s the next time), each taken here rather than as a
  difference of float32 alphas on the device."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  t = np.linspace(1.0, LAST_TIME, steps + 1)
  alpha_t = 1 - (1 - EPS) * t
  alpha_s = np.append(alpha_t[1:], 1.0)  # the noise-removal step goes to alpha = 1
  sigma_t = -np.log(alpha_t)
  return {"sigma": sigma_t, "unmask": (alpha_s - alpha_t) / (1 - alpha_t),
          "d": sigma_t - np.append(sigma_t[1:], 0.0), "gap": alpha_s - alpha_t,
          "masked": 1 - alpha_s, "last": np.arange(steps + 1) == steps}


def _mdlm_step(model, x, row, mask_id):
  """(pi [B, L, V], u [B, L]) of MDLM at state x."""
  probs = jnp.exp(subs_log_probs(model(model.embed_ids(x), jnp.zeros(x.shape[:1])), mask_id))
  return probs, jnp.full(x.shape, row["unmask"])


def _sedd_step(model, x, row, mask_id):
  """(pi, u) of SEDD's analytic step (u = 1 at the final denoiser)."""
  sigma_t = jnp.full(x.shape[:1], row["sigma"])
  log_score = sedd_log_score(model(model.embed_ids(x), sigma_t), sigma_t, model.vocab_size)
  log_score = log_score.at[..., mask_id].set(-jnp.inf)
  total = jax.nn.logsumexp(log_score, axis=-1)
  unmask = jnp.where(row["last"], 1.0, jnp.expm1(row["d"]) * jnp.exp(total))
  return jnp.exp(log_score - total[..., None]), jnp.clip(unmask, 0.0, 1.0)


def _d3pm_step(model, x, row, mask_id):
  """(pi, u) of the ancestral step with D3PM's p_theta over all V: the weights p_v
  (alpha_s - alpha_t) of real tokens and 1 - alpha_s of the mask (p_theta's own mask
  entry dropped) give pi = p_theta over real tokens and u = g / (g + 1 - alpha_s),
  g = (alpha_s - alpha_t) (1 - p_theta(m)); 1 at the noise-removal call."""
  logits = model(model.embed_ids(x), jnp.full(x.shape[:1], row["sigma"]))
  gain = row["gap"] * (1 - jax.nn.softmax(logits, axis=-1)[..., mask_id])
  unmask = jnp.where(row["last"], 1.0, gain / (gain + row["masked"]))
  return jnp.exp(subs_log_probs(logits, mask_id)), unmask


STEPS = {"mdlm": _mdlm_step, "sedd": _sedd_step, "d3pm": _d3pm_step}


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "kind", "batch_size", "seq_len", "mask_id", "cache", "temperature", "top_p",
    "mesh"))
def tokens(graphdef, params, rng, rows, *, kind: str, batch_size: int, seq_len: int,
           mask_id: int, cache: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           mesh=None) -> tuple[jax.Array, jax.Array]:
  """(tokens [B, L] int32, network calls) of a `kind` (STEPS) sample over `rows`
  (`grid`); `cache` (MDLM only) skips the call when the last step changed no token."""
  model = nnx.merge(graphdef, params)
  step_fn = STEPS[kind]
  rows = sampling.device_rows(rows)

  def body(carry, inputs):
    x, probs, changed, calls = carry
    row, key = inputs
    if cache:  # MDLM's probabilities depend on x only: reuse them while x is unchanged
      probs, unmask = jax.lax.cond(
          changed, lambda: step_fn(model, x, row, mask_id),
          lambda: (probs, jnp.full(x.shape, row["unmask"])))
      calls, kept = calls + changed, probs
    else:
      probs, unmask = step_fn(model, x, row, mask_id)
      calls, kept = calls + 1, carry[1]
    key_unmask, key_token = jax.random.split(key)
    drawn = sampling.categorical(key_token, sampling.nucleus(probs, temperature, top_p))
    reveal = (x == mask_id) & (jax.random.uniform(key_unmask, x.shape) < unmask)
    new = jnp.where(reveal, drawn, x)
    return (new, kept, jnp.any(new != x), calls), None

  x = jnp.full((batch_size, seq_len), mask_id, jnp.int32)
  # Only the cache carries the probabilities [B, L, V] from step to step.
  probs = jnp.zeros((batch_size, seq_len, model.vocab_size) if cache else (), jnp.float32)
  keys = jax.random.split(rng, len(rows["sigma"]))
  with sharding.tracing_under(mesh):
    (x, _, _, calls), _ = jax.lax.scan(body, (x, probs, jnp.array(True), jnp.int32(0)),
                                       (rows, keys))
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(x, sharding.replicated(mesh))
  return x, calls


def sampler(kind: str, cache: bool = False):
  """A sampler factory (see sampling.Options) of `kind` (STEPS)."""
  def make(steps: int, num_samples: int, seq_len: int, options: sampling.Options):
    rows = grid(steps)

    def sample(graphdef, params, rng):
      return tokens(graphdef, params, rng, rows, kind=kind, batch_size=num_samples,
                    seq_len=seq_len, mask_id=options.mask_id, cache=cache,
                    temperature=options.temperature, top_p=options.top_p,
                    mesh=sampling.params_mesh(params))
    return sample
  return make
