"""Decoding-error time: reference tables, quadrature, inverse, monotonicity, derivative."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from flmjax import schedule
from flmjax.errors import UsageError

# the paper's time reparameterisation, values of the reference's own tables.
TAU_TO_T = {
    30522: {0.01: 0.6312, 0.1: 0.7359, 0.25: 0.7735, 0.5: 0.8045, 0.75: 0.8281,
            0.9: 0.8450, 0.99: 0.8676, 1.0: 1.0},
    50258: {0.01: 0.6465, 0.1: 0.7438, 0.5: 0.8087, 0.9: 0.8477, 0.99: 0.8695},
}
T_TO_TAU = {
    30522: {0.5: 0.0012, 0.6: 0.0057, 0.7: 0.0426, 0.8: 0.4561, 0.9: 1.0},
    50258: {0.7: 0.0333, 0.8: 0.4127},
}
# Two tokens (the gentlest map), LM1B's (a run of zeros opens its table), OWT's.
VOCAB_SIZES = (2, 30522, 50258)


@functools.lru_cache(maxsize=None)
def _jitted(vocab_size, function_name):
  """One compiled function per schedule and method, reused across tests."""
  return jax.jit(getattr(schedule.get_schedule(vocab_size), function_name))


def _in_graph(function_name, vocab_size, values):
  return np.asarray(_jitted(vocab_size, function_name)(np.asarray(values, np.float32)),
                    np.float64)


def _both_paths(function_name, vocab_size, values):
  """The map through the jitted float32 graph and through the float64 host path."""
  sched = schedule.get_schedule(vocab_size)
  on_host = getattr(sched, function_name + "_host")(np.asarray(values, np.float64))
  return _in_graph(function_name, vocab_size, values), on_host


@pytest.mark.parametrize("vocab_size", sorted(TAU_TO_T))
def test_reference_tau_to_t(vocab_size):
  tau, expected = zip(*TAU_TO_T[vocab_size].items())
  for t in _both_paths("t", vocab_size, tau):
    # The table's four digits round by 5e-5 at most; float32 in the graph adds < 4e-5.
    np.testing.assert_allclose(t, expected, atol=1e-4)


@pytest.mark.parametrize("vocab_size", sorted(T_TO_TAU))
def test_reference_t_to_tau(vocab_size):
  t, expected = zip(*T_TO_TAU[vocab_size].items())
  for tau in _both_paths("tau", vocab_size, t):
    np.testing.assert_allclose(tau, expected, atol=1e-4)


def _tau_by_adaptive_quadrature(t, vocab_size):
  """V/(V-1) (q - 1/V), q = int phi(z) Phi(z + m)^(V-1) dz by adaptive quadrature."""
  shift = t / (1.0 - t)

  def integrand(z):
    return stats.norm.pdf(z) * stats.norm.cdf(z + shift) ** (vocab_size - 1)

  # The integrand's mass sits where z + m is near the maximum of V - 1 normals.
  peak = np.sqrt(2.0 * np.log(vocab_size)) - shift
  q, _ = integrate.quad(integrand, -12.0, 12.0, points=[peak], limit=200,
                        epsabs=1e-13, epsrel=1e-11)
  return vocab_size / (vocab_size - 1) * (q - 1.0 / vocab_size)


@pytest.mark.parametrize("vocab_size, atol", [
    (100, 1e-7),
    # 100 Gauss-Hermite nodes resolve the sharp Phi^50257 to about 1e-4 (largest near
    # t = 0.8); the reference's tables carry that error, so flmjax keeps it too.
    (50258, 1e-4),
])
def test_quadrature_matches_adaptive_integral(vocab_size, atol):
  t = np.array([0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9])
  expected = [_tau_by_adaptive_quadrature(x, vocab_size) for x in t]
  np.testing.assert_allclose(schedule.tau_exact(t, vocab_size), expected, rtol=0, atol=atol)


def test_two_tokens_closed_form():
  """V = 2: E_z Phi(z + m) = P(Z2 < Z1 + m) = Phi(m / sqrt 2), tau = 2 q - 1."""
  t = np.linspace(0.0, 0.99, 200)
  closed_form = 2.0 * stats.norm.cdf(t / (1.0 - t) / np.sqrt(2.0)) - 1.0
  np.testing.assert_allclose(schedule.tau_exact(t, 2), closed_form, rtol=0, atol=1e-9)


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_inverse_round_trips(vocab_size):
  sched = schedule.get_schedule(vocab_size)
  tau = np.linspace(0.01, 0.99, 2001)
  np.testing.assert_allclose(sched.tau_host(sched.t_host(tau)), tau, atol=1e-4)
  np.testing.assert_allclose(_in_graph("tau", vocab_size, _in_graph("t", vocab_size, tau)),
                             tau, atol=1e-4)
  # t -> tau -> t only where tau is not flat (it is ~0 early, ~1 late).
  t = np.linspace(0.0, 1.0, 2001)
  tau = schedule.tau_exact(t, vocab_size)
  steep = (tau > 1e-3) & (tau < 0.999)
  assert steep.sum() > 200
  for back in (sched.t_host(sched.tau_host(t)),
               _in_graph("t", vocab_size, _in_graph("tau", vocab_size, t))):
    np.testing.assert_allclose(back[steep], t[steep], atol=1e-4)


@pytest.mark.parametrize("vocab_size", (2, 1000, 30522, 50258))
def test_table_is_increasing_apart_from_zeros_at_the_start(vocab_size):
  """The tilt goes on before the clip (as in the reference): only a run of zeros repeats."""
  tau = schedule.tau_exact(np.linspace(0.0, 1.0, schedule.TABLE_POINTS), vocab_size)
  assert tau[0] < 1e-6 and tau[-1] == 1.0
  rising = tau > 0
  assert np.all(np.diff(tau[rising]) > 0)
  assert not np.any(rising[:-1] & ~rising[1:])


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_maps_are_monotone_with_fixed_endpoints_and_clipped_inputs(vocab_size):
  grid = np.linspace(0.0, 1.0, 100_001)
  outside = np.array([-0.5, -1e-3, 1.0 + 1e-3, 7.0])
  for name in ("tau", "t"):
    # Not-a-knot splines ripple by ~1e-10 where the table leaves its run of zeros;
    # float32 rounding adds up to one ulp of 1.
    in_graph_and_host = _both_paths(name, vocab_size, np.concatenate([grid, outside]))
    for values, ripple in zip(in_graph_and_host, (1.2e-7, 1e-9)):
      on_grid, clipped = values[:len(grid)], values[len(grid):]
      assert np.diff(on_grid).min() > -ripple, name
      # The reference does not pin tau(0): its quadrature error there is ~1e-7 at V = 50258.
      assert on_grid[0] == 0.0 or (name == "tau" and on_grid[0] < 1e-6), name
      assert on_grid[-1] == 1.0, name
      np.testing.assert_array_equal(clipped, on_grid[[0, 0, -1, -1]])


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_dtau_dt_is_the_derivative(vocab_size):
  sched = schedule.get_schedule(vocab_size)
  t = np.linspace(0.0, 1.0, 401)[1:-1]
  tau = schedule.tau_exact(t, vocab_size)
  t = t[(tau > 1e-3) & (tau < 0.999)]  # where the output clip cannot touch the gradient
  slope = np.asarray(jax.jit(sched.dtau_dt)(t.astype(np.float32)))
  grad = np.asarray(jax.jit(jax.vmap(jax.grad(sched.tau)))(t.astype(np.float32)))
  np.testing.assert_allclose(slope, grad, rtol=1e-4, atol=1e-6)
  step = 1e-6
  finite_difference = (schedule.tau_exact(t + step, vocab_size)
                       - schedule.tau_exact(t - step, vocab_size)) / (2 * step)
  np.testing.assert_allclose(slope, finite_difference, rtol=1e-3, atol=1e-5)


def test_any_shape_vmap_and_dtypes():
  sched = schedule.get_schedule(2)
  t = np.random.default_rng(0).uniform(-0.1, 1.1, size=(2, 3, 4))
  for name in ("tau", "t", "dtau_dt"):
    out = _jitted(2, name)(t.astype(np.float32))
    assert out.shape == t.shape and out.dtype == jnp.float32, name
    by_row = jax.jit(jax.vmap(getattr(sched, name)))(t.astype(np.float32))
    np.testing.assert_array_equal(by_row, out)
  assert sched.tau_host(t).dtype == np.float64 and sched.tau_host(t).shape == t.shape
  np.testing.assert_allclose(_in_graph("tau", 2, t), sched.tau_host(t), atol=1e-6)


def test_schedule_is_built_once_and_is_a_valid_static_argument():
  assert schedule.get_schedule(30522) is schedule.get_schedule(30522)
  apply = jax.jit(lambda sched, t: sched.tau(t), static_argnums=0)
  np.testing.assert_allclose(apply(schedule.get_schedule(30522), 0.8), 0.4561, atol=1e-3)


def test_vocab_size_below_two_is_a_usage_error():
  with pytest.raises(UsageError, match="vocab_size=1"):
    schedule.tau_exact(np.array([0.5]), 1)
