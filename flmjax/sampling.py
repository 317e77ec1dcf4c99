"""One compiled sampler driver; the samplers are step rules with host-computed time grids.

A sampler runs N network evaluations: a `lax.scan` over the first N - 1 rows of its grid
(each row one step of its rule), then the last evaluation, whose argmax are the tokens
(`tokens`; without guidance they are taken from the output layer's input in chunks,
never building the [B, L, V] logits; `probabilities` returns that evaluation's
probabilities from a given noise, for tests and analysis). Grids are computed on the host
in float64 and passed in; the step count is their static length, so there is one compiled
function per (rule, B, L, N).

Both samplers of the continuous flow step linearly in the state z:
z <- keep z + move D + noise eps, with D the denoiser's probabilities at the row's times.

- EULER (FLM): tau_i = linspace(0, 1, N + 1), t_i = t(tau_i);
  D = softmax(net(z, tau_i)), keep = 1 - a_i, move = a_i, a_i = (t_{i+1} - t_i) / (1 - t_i).
- FLOW_MAP (FMLM, churn gamma in [0, 1]): sigma = 1 - t_{i+1},
  sigma~ = sigma sqrt(1 - gamma^2), t~ = 1 - sigma~, D = delta(z; tau_i, tau(t~)),
  keep = (1 - t~) / (1 - t_i), move = (t~ - t_i) / (1 - t_i) + sigma~ - sigma,
  noise = gamma sigma. One step is delta_{0,1}(z); gamma = 0 is the deterministic flow map.

The network reads z only through z @ E, so the state is h = z @ E [B, L, D] (`latent`,
the default): D @ E is the only V-sized product per step besides the logits. The V-space
state z [B, L, V] (`latent=False`, config.noise "vocab") draws its noise in V dimensions,
as the reference does: the same distribution of samples, at far more time and memory.

Given a `Condition` (flmjax/conditioning.py), every evaluation reads the given positions as
their clean tokens (the paper's clamping) and the tokens come back as given; `guidance`
w > 0 adds classifier-free guidance (`_logits`).
"""

import dataclasses
import functools
from typing import Callable, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flmjax import conditioning, flow, sharding
from flmjax.schedule import get_schedule


def _times(vocab_size: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """tau_i = linspace(0, 1, steps + 1) and t_i = t(tau_i), float64."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  tau = np.linspace(0.0, 1.0, steps + 1)
  return tau, get_schedule(vocab_size).t_host(tau)


def euler_grid(vocab_size: int, steps: int, gamma: float = 0.0) -> dict[str, np.ndarray]:
  """{tau [N], keep, move, noise [N - 1]} of the Euler sampler (it has no churn): z <- z +
  (t_{i+1} - t_i) (D - z) / (1 - t_i), as the paper writes it; the reference adds 1e-5 to
  1 - t_i, which changes a step by a relative 1e-5 / (1 - t_i), under 1e-4 on these
  grids."""
  del gamma
  tau, t = _times(vocab_size, steps)
  a = (t[1:steps] - t[:steps - 1]) / (1 - t[:steps - 1])
  return {"tau": tau[:steps], "keep": 1 - a, "move": a, "noise": np.zeros_like(a)}


def flow_map_grid(vocab_size: int, steps: int, gamma: float) -> dict[str, np.ndarray]:
  """{tau, tau_next [N], keep, move, noise [N - 1]} of the flow-map sampler with churn."""
  if not 0 <= gamma <= 1:
    raise ValueError(f"the churn gamma must be in [0, 1], got {gamma}")
  tau, t = _times(vocab_size, steps)
  sigma = 1 - t[1:]
  sigma_tilde = sigma * np.sqrt(1 - gamma**2)
  t_tilde = 1 - sigma_tilde
  keep = (1 - t_tilde) / (1 - t[:-1])
  move = (t_tilde - t[:-1]) / (1 - t[:-1]) + sigma_tilde - sigma
  return {"tau": tau[:-1], "tau_next": get_schedule(vocab_size).tau_host(t_tilde),
          "keep": keep[:-1], "move": move[:-1], "noise": (gamma * sigma)[:-1]}


# Tokens per chunk of the last evaluation's argmax (flow.head_argmax): the fastest on CPU
# at V 8192 and 50258 of those tried (8 tokens to all), and [128, V] logits at a time.
ARGMAX_CHUNK = 128


def _times_of(row, batch: int) -> list[jax.Array]:
  return [jnp.full((batch,), row[k]) for k in ("tau", "tau_next") if k in row]


class Condition(NamedTuple):
  """Given positions (flmjax/conditioning.py): the mask [B, L] bool and the tokens [B, L]
  whose values it gives."""
  given: jax.Array
  tokens: jax.Array


def _clamp(model, state, condition: Condition | None, latent: bool) -> jax.Array:
  """The state with the given positions reset to their clean tokens: E[token] (latent) or
  the one-hot."""
  if condition is None:
    return state
  clean = (model.embed_ids(condition.tokens) if latent
           else jax.nn.one_hot(condition.tokens, state.shape[-1]))
  return conditioning.clamp(state, condition.given, clean)


def _given(condition: Condition | None):
  return None if condition is None else condition.given


def _logits(model, state, row, latent: bool, condition: Condition | None = None,
            guidance: float = 0.0) -> tuple[jax.Array, jax.Array | None]:
  """(logits [B, L, V], the unconditional logits or None) of the denoiser at the row's
  time(s), the given positions of `condition` clamped to their tokens. With guidance
  w > 0 (classifier-free guidance) the logits are (1 + w) times the conditional ones minus
  w times the unconditional ones, whose input is `state` itself (the given positions as
  the unconditional flow left them) without the condition embedding: their softmax is
  p_c^(1 + w) p_u^(-w), renormalised, a probability vector for every w."""
  times = _times_of(row, state.shape[0])

  def run(s, given):
    return model(s if latent else model.embed(s), *times, given=given)
  conditional = run(_clamp(model, state, condition, latent), _given(condition))
  if not guidance or condition is None:
    return conditional, None
  unconditional = run(state, None)
  return (1 + guidance) * conditional - guidance * unconditional, unconditional


def _denoise(model, state, row, latent: bool, condition: Condition | None = None,
             guidance: float = 0.0):
  """The denoiser's probabilities [B, L, V] at the row's time(s) (see _logits)."""
  return jax.nn.softmax(_logits(model, state, row, latent, condition, guidance)[0], axis=-1)


def flow_step(model, state, row, key, latent: bool, factor, condition=None,
              guidance: float = 0.0):
  """z <- keep z + move D (+ noise eps when `key` is given), in latent or V-space form;
  `factor` is the noise factor C of flow.embedded_noise (latent churn only). Each
  evaluation reads the given positions of `condition` as their tokens (_logits); the
  state keeps at them the flow of the unconditional denoiser, the input of guidance's
  unconditional evaluation (without guidance, nothing reads it)."""
  logits, unconditional = _logits(model, state, row, latent, condition, guidance)
  if unconditional is not None:
    logits = jnp.where(condition.given[..., None], unconditional, logits)
  probs = jax.nn.softmax(logits, axis=-1)
  target = flow.project(probs, model.vocab_embed[...]) if latent else probs
  state = row["keep"] * state + row["move"] * target
  if key is not None:
    if latent:
      eps = flow.embedded_noise(key, model.vocab_embed[...], state.shape[:2], factor=factor)
    else:
      eps = jax.random.normal(key, state.shape, jnp.float32)
    state = state + row["noise"] * eps
  return state


def device_rows(grid: dict) -> dict:
  """A sampler's host grid (float64 and bool rows) on the device: float32 and bool."""
  return jax.tree.map(lambda x: jnp.asarray(x, bool if x.dtype == bool else jnp.float32),
                      grid)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A sampler: its name, its host grid (vocab_size, steps, gamma) -> arrays, its step
  (model, state, row, key, latent, factor, condition, guidance) -> state, and whether it
  takes churn."""
  name: str
  grid: Callable[..., dict]
  step: Callable = flow_step
  churn: bool = False


EULER = Rule("euler", euler_grid)
FLOW_MAP = Rule("flowmap", flow_map_grid, churn=True)


def _integrate(model, state, grid, rng, rule: Rule, latent: bool, churn: bool,
               condition: Condition | None = None, guidance: float = 0.0):
  """The rule's steps over the grid from `state`: (the last state, the last row's
  times)."""
  grid = device_rows(grid)
  embed = model.vocab_embed[...]
  factor = flow.noise_factor(embed) if churn and latent and embed.shape[0] > embed.shape[1] \
      else None
  rows = {k: v[:-1] if k.startswith("tau") else v for k, v in grid.items()}
  last = {k: grid[k][-1] for k in grid if k.startswith("tau")}

  def body(state, inputs):
    row, key = inputs
    return rule.step(model, state, row, key if churn else None, latent, factor,
                     condition, guidance), None

  keys = jax.random.split(rng, len(grid["keep"]))
  state, _ = jax.lax.scan(body, state, (rows, keys))
  return state, last


def initial_state(model, rng, shape: tuple[int, int], latent: bool) -> jax.Array:
  """Noise z ~ N(0, I) [B, L, V], as h = z @ E [B, L, D] when `latent`."""
  if latent:
    return flow.embedded_noise(rng, model.vocab_embed[...], shape)
  return jax.random.normal(rng, (*shape, model.vocab_size), jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "rule", "latent", "churn",
                                             "guidance"))
def probabilities(graphdef, params, z, grid, rng, *, rule: Rule, latent: bool = True,
                  churn: bool = False, condition: Condition | None = None,
                  guidance: float = 0.0) -> jax.Array:
  """The sampler's last probabilities [B, L, V] from a given V-space noise z [B, L, V]:
  what `tokens` takes the argmax of, for tests and analysis (not used by the modes)."""
  model = nnx.merge(graphdef, params)
  state, last = _integrate(model, model.embed(z) if latent else z, grid, rng, rule, latent,
                           churn, condition, guidance)
  return _denoise(model, state, last, latent, condition, guidance)


@functools.partial(jax.jit, static_argnames=("graphdef", "rule", "batch_size", "seq_len",
                                             "latent", "churn", "mesh", "guidance"))
def tokens(graphdef, params, rng, grid, *, rule: Rule, batch_size: int, seq_len: int,
           latent: bool = True, churn: bool = False, mesh=None,
           condition: Condition | None = None, guidance: float = 0.0) -> jax.Array:
  """Tokens [batch_size, seq_len] int32 from fresh noise; with `mesh`, the samples are
  split over its batch axes and the tokens replicated. With `condition`, every
  evaluation reads its given positions as their tokens (clamping), which come back as
  given; `guidance` > 0 adds classifier-free guidance (_logits)."""
  model = nnx.merge(graphdef, params)
  # A rule that takes churn draws it from a second key; the Euler noise is rng's own.
  rng_init, rng_steps = jax.random.split(rng) if rule.churn else (rng, rng)
  state = initial_state(model, rng_init, (batch_size, seq_len), latent)
  with sharding.tracing_under(mesh):
    state, last = _integrate(model, state, grid, rng_steps, rule, latent, churn, condition,
                             guidance)
    # The argmax of the probabilities is that of the logits (the cap and the softmax are
    # increasing).
    if guidance and condition is not None:
      result = jnp.argmax(_logits(model, state, last, latent, condition, guidance)[0], -1)
    else:
      clamped = _clamp(model, state, condition, latent)
      features = model.features(clamped if latent else model.embed(clamped),
                                *_times_of(last, batch_size), given=_given(condition))
      result = flow.head_argmax(features, model.output.kernel[...], model.output.bias[...],
                                model.output.dtype, ARGMAX_CHUNK)
    if condition is not None:
      result = jnp.where(condition.given, condition.tokens, result)
  if mesh is None:
    return result
  return jax.lax.with_sharding_constraint(result, sharding.replicated(mesh))


def exponential(bits: jax.Array) -> jax.Array:
  """Exp(1) draws [...] float32 from 48 random bits each (bits [2, ...] uint32, the top 24 of
  each word): E = -log(1 - u), u = (a + (b + 1/2) 2^-24) 2^-24 on a grid of 2^-48. Small E,
  the ones that win a race, keep float32's relative precision down to E ~ 2^-49; one
  float32 uniform (23 bits) would stop at 2^-24."""
  high, low = (jnp.right_shift(word, 8).astype(jnp.float32) for word in bits)
  u = (high + (low + 0.5) * 2.0 ** -24) * 2.0 ** -24  # rounds to 1 at most: E = inf
  return -jnp.log1p(-u)


def categorical(rng: jax.Array, probs: jax.Array) -> jax.Array:
  """One draw from each row of probs [..., V] (non-negative, any scale) -> [...] int32, by
  the exponential race argmax_v p_v / E_v, E_v ~ Exp(1) (`exponential`), as the reference
  draws in float64: a token some 30 nats less probable than the likeliest is still drawn
  at its rate, where float32 Gumbel-max, whose noise stops at 16.6, almost never draws one
  more than 17 nats below."""
  race = jnp.log(probs) - jnp.log(exponential(jax.random.bits(rng, (2, *probs.shape))))
  return jnp.argmax(race, axis=-1).astype(jnp.int32)


def nucleus(probs: jax.Array, temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
  """probs [..., V] (normalised) restricted to its nucleus: the smallest set of most
  probable tokens whose mass reaches top_p (a token is kept when the mass of the tokens
  ranked above it is below top_p, so the top one always is), then at `temperature`
  (p^(1/T)), renormalised: the reference's order for Duo (top-p of q, then the
  temperature of its categorical draw). The identity at T = 1, top_p = 1."""
  if top_p < 1.0:
    order = jnp.argsort(-probs, axis=-1)
    ranked = jnp.take_along_axis(probs, order, axis=-1)
    keep = jnp.cumsum(ranked, axis=-1) - ranked < top_p
    keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)
    probs = jnp.where(keep, probs, 0.0)
    probs = probs / probs.sum(axis=-1, keepdims=True)
  if temperature != 1.0:
    probs = jax.nn.softmax(jnp.log(probs) / temperature, axis=-1)
  return probs


@dataclasses.dataclass(frozen=True)
class Options:
  """How a sampler factory (steps, num_samples, seq_len, options) -> function samples,
  beside its step count: from config.sample, config.noise and the tokenizer's ids
  (registry.sampler)."""
  gamma: float = 0.0  # churn of the flow-map sampler
  latent: bool = True  # the continuous state as z @ E (config.noise == "latent")
  temperature: float = 1.0  # discrete baselines only
  top_p: float = 1.0  # discrete baselines only
  mask_id: int = -1  # absorbing baselines: the mask token
  bos_id: int = 0  # autoregressive baseline: the first token
  guidance: float = 0.0  # classifier-free guidance of conditional sampling (FLM, FMLM)


def params_mesh(params):
  """The mesh the parameters are placed on (None when they are not on one)."""
  placement = getattr(params["vocab_embed"], "sharding", None)
  return placement.mesh if isinstance(placement, jax.sharding.NamedSharding) else None


def sampler(rule: Rule) -> Callable:
  """The sampler factory (steps, num_samples, seq_len, Options) -> function (graphdef,
  params, rng, condition=None) -> (tokens [num_samples, seq_len] int32, network calls)
  of a flow rule."""
  def make(steps: int, num_samples: int, seq_len: int, options: Options):
    gamma = options.gamma if rule.churn else 0.0

    def sample(graphdef, params, rng, condition: Condition | None = None):
      grid = rule.grid(params["vocab_embed"].shape[0], steps, gamma)
      guided = bool(options.guidance) and condition is not None  # two evaluations a call
      return tokens(graphdef, params, rng, grid, rule=rule, batch_size=num_samples,
                    seq_len=seq_len, latent=options.latent,
                    churn=bool(np.any(grid["noise"] > 0)), mesh=params_mesh(params),
                    condition=condition, guidance=options.guidance), steps * (1 + guided)
    return sample
  return make
