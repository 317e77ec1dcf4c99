"""The Euler sampler: its steps by hand, latent == V-space, one compile, learning check."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import randomize
from flmjax import flow, sampling
from flmjax.models import dit
from flmjax.schedule import get_schedule

V, D, L, B = 61, 32, 8, 4


def _random_model(seed=7):
  return nnx.split(randomize(dit.DiT(V, D, 1, 4, 16, rngs=nnx.Rngs(0), dtype=jnp.float32),
                             seed=seed))


def test_grid_follows_the_schedule():
  tau, coeff = sampling.euler_grid(V, 4)
  np.testing.assert_array_equal(tau, [0, 0.25, 0.5, 0.75])
  t = get_schedule(V).t_host(np.array([0, 0.25, 0.5, 0.75]))
  np.testing.assert_allclose(coeff, (t[1:] - t[:-1]) / (1 - t[:-1]))


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
    got = sampling.euler_from(graphdef, params, z, *sampling.euler_grid(V, steps),
                              latent=latent)
    np.testing.assert_allclose(got, probs, atol=2e-5)
  one_step = sampling.euler_from(graphdef, params, z, *sampling.euler_grid(V, 1))
  np.testing.assert_allclose(
      one_step, jax.nn.softmax(model(model.embed(z), jnp.zeros(B)), axis=-1), atol=1e-6)


def test_latent_and_v_space_samplers_give_identical_tokens():
  graphdef, params = _random_model(seed=3)
  z = jax.random.normal(jax.random.key(1), (16, L, V))
  for steps in (1, 8):
    grid = sampling.euler_grid(V, steps)
    latent = sampling.euler_from(graphdef, params, z, *grid, latent=True)
    v_space = sampling.euler_from(graphdef, params, z, *grid, latent=False)
    np.testing.assert_array_equal(jnp.argmax(latent, -1), jnp.argmax(v_space, -1))


def test_sampler_compiles_once_per_batch_length_and_steps():
  graphdef, params = _random_model()
  before = sampling.euler_tokens._cache_size()
  for seed in range(3):
    tokens = sampling.sample_flm(graphdef, params, jax.random.key(seed), B, L, 4)
  assert tokens.shape == (B, L) and tokens.dtype == jnp.int32
  assert sampling.euler_tokens._cache_size() == before + 1
  sampling.sample_flm(graphdef, params, jax.random.key(0), B, L, 5)
  assert sampling.euler_tokens._cache_size() == before + 2


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
  # one step is not exact yet; a few Euler steps are.
  for steps in (8, 32):
    samples = sampling.sample_flm(graphdef, params, jax.random.key(99), 8, L, steps)
    np.testing.assert_array_equal(samples, jnp.broadcast_to(sequence, (8, L)))
