"""The sampler driver and its two rules: the Euler sampler (FLM) and the flow-map sampler
with churn (FMLM), step by step against their definitions written out in V space;
latent == V-space; one compile per shape; learning checks."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import randomize
from flmjax import flow, sampling
from flmjax.models import dit
from flmjax.schedule import get_schedule

V, D, L, B = 61, 32, 8, 4


def _random_model(seed=7, two_time=False):
  return nnx.split(randomize(dit.DiT(V, D, 1, 4, 16, two_time=two_time, rngs=nnx.Rngs(0),
                                     dtype=jnp.float32), seed=seed))


def _euler(graphdef, params, z, steps, latent=True):
  return sampling.probabilities(graphdef, params, z, sampling.euler_grid(V, steps),
                                jax.random.key(0), rule=sampling.EULER, latent=latent)


def _flow_map(graphdef, params, z, steps, gamma=0.0, rng=jax.random.key(0), latent=True):
  return sampling.probabilities(graphdef, params, z, sampling.flow_map_grid(V, steps, gamma),
                                rng, rule=sampling.FLOW_MAP, latent=latent,
                                churn=gamma > 0 and steps > 1)


def _probs(model, x, *tau):
  return jax.nn.softmax(model(model.embed(x), *tau), axis=-1)


def test_euler_grid_follows_the_schedule():
  grid = sampling.euler_grid(V, 4)
  np.testing.assert_array_equal(grid["tau"], [0, 0.25, 0.5, 0.75])
  t = get_schedule(V).t_host(np.array([0, 0.25, 0.5, 0.75]))
  a = (t[1:] - t[:-1]) / (1 - t[:-1])
  np.testing.assert_allclose(grid["move"], a)
  np.testing.assert_allclose(grid["keep"], 1 - a)
  assert (grid["noise"] == 0).all() and "tau_next" not in grid


def test_euler_steps_by_hand_and_the_last_step_returns_the_denoiser():
  graphdef, params = _random_model()
  model = nnx.merge(graphdef, params)
  z = jax.random.normal(jax.random.key(0), (B, L, V))
  steps = 3
  tau = np.linspace(0, 1, steps + 1)
  t = get_schedule(V).t_host(tau)
  state = z
  for i in range(steps):
    probs = jax.nn.softmax(model(model.embed(state), jnp.full((B,), tau[i])), axis=-1)
    if i < steps - 1:
      state = state + (t[i + 1] - t[i]) * (probs - state) / (1 - t[i])
  for latent in (False, True):
    np.testing.assert_allclose(_euler(graphdef, params, z, steps, latent), probs, atol=2e-5)
  one_step = _euler(graphdef, params, z, 1)
  np.testing.assert_allclose(
      one_step, jax.nn.softmax(model(model.embed(z), jnp.zeros(B)), axis=-1), atol=1e-6)


@pytest.mark.slow
def test_latent_and_v_space_samplers_give_identical_tokens():
  graphdef, params = _random_model(seed=3)
  z = jax.random.normal(jax.random.key(1), (16, L, V))
  for steps in (1, 8):
    latent = _euler(graphdef, params, z, steps, latent=True)
    v_space = _euler(graphdef, params, z, steps, latent=False)
    np.testing.assert_array_equal(jnp.argmax(latent, -1), jnp.argmax(v_space, -1))


def test_sampler_compiles_once_per_batch_length_and_steps():
  graphdef, params = _random_model()
  before = sampling.tokens._cache_size()
  sample = sampling.sampler(sampling.EULER)(4, B, L, sampling.Options())
  for seed in range(3):
    tokens, calls = sample(graphdef, params, jax.random.key(seed))
  assert tokens.shape == (B, L) and tokens.dtype == jnp.int32 and calls == 4
  assert sampling.tokens._cache_size() == before + 1
  sampling.sampler(sampling.EULER)(5, B, L, sampling.Options())(graphdef, params,
                                                                jax.random.key(0))
  assert sampling.tokens._cache_size() == before + 2


def test_flow_map_grid_without_churn_is_the_deterministic_flow_map():
  steps = 4
  grid = sampling.flow_map_grid(V, steps, 0.0)
  t = get_schedule(V).t_host(np.linspace(0, 1, steps + 1))
  np.testing.assert_allclose(grid["keep"], (1 - t[1:-1]) / (1 - t[:-2]))
  np.testing.assert_allclose(grid["move"], (t[1:-1] - t[:-2]) / (1 - t[:-2]))
  np.testing.assert_allclose(grid["tau_next"], np.linspace(0, 1, steps + 1)[1:], atol=1e-6)
  assert (grid["noise"] == 0).all()


@pytest.mark.parametrize("gamma", [0.3, 0.8, 1.0])
def test_churn_keeps_the_noise_level_of_the_schedule(gamma):
  """z~ carries noise (1 - t_i) keep = 1 - t~; adding gamma sigma eps brings it back to
  sigma = 1 - t_{i+1}, and the data weight to t_{i+1}."""
  steps = 5
  grid = sampling.flow_map_grid(V, steps, gamma)
  t = get_schedule(V).t_host(np.linspace(0, 1, steps + 1))
  noise_std = np.sqrt(((1 - t[:-2]) * grid["keep"]) ** 2 + grid["noise"] ** 2)
  np.testing.assert_allclose(noise_std, 1 - t[1:-1], rtol=1e-9)
  np.testing.assert_allclose(t[:-2] * grid["keep"] + grid["move"], t[1:-1], rtol=1e-9)
  np.testing.assert_allclose(grid["noise"], gamma * (1 - t[1:-1]))
  t_tilde = 1 - (1 - t[1:]) * np.sqrt(1 - gamma**2)  # the student's second time
  np.testing.assert_allclose(get_schedule(V).t_host(grid["tau_next"]), t_tilde, atol=1e-6)


@pytest.mark.parametrize("latent", [True, False])
def test_a_churn_steps_noise_is_the_v_space_noise_seen_through_the_embedding(latent):
  """A flow-map step with churn adds noise eps sigma, eps ~ N(0, I) in V space; the latent
  sampler carries it as eps @ E, of covariance E^T E. With keep 1 and move 0, the step's
  increments over 4,096 positions have that covariance (I_V in V space)."""
  graphdef, params = _random_model(two_time=True)
  model = nnx.merge(graphdef, params)
  embed = np.asarray(model.vocab_embed[...], np.float64)
  width = D if latent else V
  state = jnp.zeros((64, 64, width))
  row = {"tau": jnp.float32(0.3), "tau_next": jnp.float32(0.6), "keep": jnp.float32(1.0),
         "move": jnp.float32(0.0), "noise": jnp.float32(0.5)}
  factor = flow.noise_factor(model.vocab_embed[...]) if latent else None
  step = sampling.flow_step(model, state, row, jax.random.key(1), latent, factor)
  increments = np.asarray(step, np.float64).reshape(-1, width) / 0.5
  covariance = increments.T @ increments / len(increments)
  expected = embed.T @ embed if latent else np.eye(V)
  assert np.abs(covariance - expected).max() < 0.1 * np.abs(expected).max()


@pytest.mark.parametrize("gamma", [pytest.param(0.5, marks=pytest.mark.slow), 1.0])
def test_churn_sampler_steps_by_hand(gamma):
  """Section 5's churn sampler written out in V space, with the sampler's noise draws."""
  graphdef, params = _random_model(seed=3, two_time=True)
  model = nnx.merge(graphdef, params)
  schedule = get_schedule(V)
  steps, rng = 3, jax.random.key(7)
  z = jax.random.normal(jax.random.key(0), (4, L, V))
  tau = np.linspace(0, 1, steps + 1)
  t = schedule.t_host(tau)
  keys = jax.random.split(rng, steps - 1)
  for i in range(steps):
    sigma = 1 - t[i + 1]
    sigma_tilde = sigma * np.sqrt(1 - gamma**2)
    t_tilde = 1 - sigma_tilde
    probs = _probs(model, z, jnp.full(4, tau[i]), jnp.full(4, schedule.tau_host(t_tilde)))
    if i < steps - 1:
      z_tilde = (1 - t_tilde) / (1 - t[i]) * z + (t_tilde - t[i]) / (1 - t[i]) * probs
      z = z_tilde + (sigma_tilde - sigma) * probs + gamma * sigma * jax.random.normal(
          keys[i], z.shape)
  z0 = jax.random.normal(jax.random.key(0), (4, L, V))
  got = _flow_map(graphdef, params, z0, steps, gamma, rng, latent=False)
  np.testing.assert_allclose(got, probs, atol=3e-5)


def test_flow_map_sampler_steps_by_hand():
  graphdef, params = _random_model(seed=3, two_time=True)
  model = nnx.merge(graphdef, params)
  z = jax.random.normal(jax.random.key(0), (4, L, V))
  steps = 3
  tau = np.linspace(0, 1, steps + 1)
  t = get_schedule(V).t_host(tau)
  state = z
  for i in range(steps):
    probs = jax.nn.softmax(model(model.embed(state), jnp.full(4, tau[i]),
                                 jnp.full(4, tau[i + 1])), axis=-1)
    if i < steps - 1:
      state = flow.flow_map(state, probs, jnp.full(4, t[i]), jnp.full(4, t[i + 1]))
  for latent in (True, False):
    np.testing.assert_allclose(_flow_map(graphdef, params, z, steps, latent=latent), probs,
                               atol=3e-5)
  one = _flow_map(graphdef, params, z, 1)
  np.testing.assert_allclose(one, jax.nn.softmax(model(model.embed(z), jnp.zeros(4),
                                                       jnp.ones(4)), axis=-1), atol=1e-6)


@pytest.mark.slow
@pytest.mark.learning
def test_a_model_trained_on_one_sequence_samples_it_back():
  sequence = jnp.array([5, 17, 3, 42, 8, 8, 29, 11])
  model = dit.DiT(V, 64, 2, 4, 32, rngs=nnx.Rngs(0), dtype=jnp.float32)
  graphdef, params = nnx.split(model)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  tokens = jnp.broadcast_to(sequence, (32, L))
  schedule = get_schedule(V)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(params):
      m = nnx.merge(graphdef, params)
      return flow.flm_loss(lambda h, tau, key: m(h, tau), m.vocab_embed[...], tokens, rng,
                           schedule)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(300):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert np.mean(losses[-20:]) < 0.02 * losses[0]
  # From pure noise the network can place tokens only through the sequence's edges, so
  # one step is not exact yet; a few Euler steps are, up to float rounding in training:
  # all 64 tokens at 8 and 32 steps under jax 0.10.2, 63 and 64 under jax 0.11.2.
  for steps in (8, 32):
    samples = sampling.sampler(sampling.EULER)(steps, 8, L, sampling.Options())(
        graphdef, params, jax.random.key(99))[0]
    assert np.mean(np.asarray(samples) == np.asarray(sequence)) >= 62 / 64, samples


def test_the_exponential_race_draws_each_token_at_its_weight():
  """argmax_v p_v / E_v over unnormalised weights p: v with probability p_v / sum(p), never
  a zero weight."""
  weights = np.array([5.0, 2.5, 1.5, 1.0, 0.0])
  n = 200_000
  drawn = sampling.categorical(jax.random.key(0), jnp.broadcast_to(weights, (n, 5)))
  assert drawn.dtype == jnp.int32
  frequency = np.bincount(np.asarray(drawn), minlength=5) / n
  expected = weights / weights.sum()
  np.testing.assert_allclose(frequency, expected,
                             atol=5 * np.sqrt(expected * (1 - expected) / n).max())
  assert frequency[4] == 0


def test_race_exponentials_keep_their_precision_where_they_win():
  """E = -log(1 - u) from 48 bits against float64: to float32's precision for the small E
  that win races, down to u ~ 2^-48 (tokens ~30 nats below the likeliest)."""
  rng = np.random.default_rng(0)
  bits = rng.integers(0, 2**32, size=(2, 4000), dtype=np.uint64)
  bits[0, :2000] = rng.integers(0, 2**8, 2000)  # the high word's top 24 bits zero: u < 2^-24
  bits[0, :10], bits[1, :10] = 0, np.arange(10) << 8  # the smallest u of all
  high, low = (bits >> 8).astype(np.float64)
  u = (high + (low + 0.5) / 2**24) / 2**24
  expected = -np.log1p(-u)
  got = np.asarray(sampling.exponential(jnp.asarray(bits, jnp.uint32)), np.float64)
  small = expected < 0.5
  assert small.sum() > 2500 and expected.min() < 2.0**-48
  np.testing.assert_allclose(got[small], expected[small], rtol=1e-6)
  np.testing.assert_allclose(got, expected, rtol=1e-3)
