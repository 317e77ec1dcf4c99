"""Decoding-error time: the map between interpolant time t and the network's time tau.

For x_t = (1 - t) * eps + t * onehot(token) over a vocabulary of size V, the argmax of
x_t is the right token with probability

  q(t) = E_{z ~ N(0,1)} [ Phi(z + t / (1 - t)) ^ (V - 1) ],

and tau(t) = V / (V - 1) * (q(t) - 1 / V), clipped to [0, 1], is how far decoding has come
from chance (0 at pure noise) to certainty (1). The network is conditioned on tau, training
draws tau uniformly and samplers step uniformly in tau (the paper's time reparameterisation).

The map is steep at both ends: for V ~ 50k, tau stays below 0.01 until t ~ 0.65, then
rises to 0.99 by t ~ 0.87, and is within 1e-10 of 1 beyond t ~ 0.92. So we follow the
reference exactly instead of approximating it: q by 100-node Gauss-Hermite quadrature in
log space, tabulated in float64 on 10,000 uniform t, and not-a-knot cubic splines fitted
both ways (t -> tau, and tau -> t on the sorted unique tabulated tau). `Schedule` keeps
the splines' breakpoints and coefficients as numpy tables and evaluates them either in
the graph (jnp: jit, vmap and grad) or on the host in float64 (sampler time grids).

Kept from the reference: its tilt (t - 1) * 1e-10 goes on before the clip, so where the
quadrature falls below chance near t = 0 (V = 30522) the table opens with a short run of
zeros, of which the inverse keeps the first (t = 0); tau(0) is not pinned to 0 (it is the
quadrature's ~1e-7 at V = 50258); t(0) = 0 once clipped, and both maps send 1 to 1.
"""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from scipy.interpolate import CubicSpline
from scipy.special import log_ndtr

from flmjax.errors import UsageError

QUADRATURE_NODES = 100
TABLE_POINTS = 10_000
ONE_MINUS_T_FLOOR = 1e-12
# The reference's tilt: without it tau is exactly 1 (in float64) over the last few
# percent of t and the inverse spline would see one tau for many t.
MONOTONE_SLOPE = 1e-10


@functools.cache
def _hermite(nodes: int) -> tuple[np.ndarray, np.ndarray]:
  """Gauss-Hermite points z and weights w for E_{z ~ N(0, 1)} f(z) = sum_i w_i f(z_i)."""
  x, w = np.polynomial.hermite.hermgauss(nodes)
  return np.sqrt(2.0) * x, w / np.sqrt(np.pi)


def argmax_probability(mu, ids: int, nodes: int, weight=None) -> np.ndarray:
  """E_{z ~ N(0, 1)} weight(z) Phi(z + mu)^(ids - 1), float64 of mu's shape, by `nodes`-
  point Gauss-Hermite quadrature of exp((ids - 1) log Phi) (Phi ** (V - 1) underflows for
  V ~ 50k; its log does not). With no weight: the probability that of `ids` coordinates,
  one N(mu, 1) and the others N(0, 1), the first is the largest. FLM's tau(t) (mu = t /
  (1 - t), the reference's 100 nodes) and Duo's alpha(g) (flmjax/uniform.py) are affine in
  it."""
  z, w = _hermite(nodes)
  integrand = np.exp((ids - 1) * log_ndtr(z + np.asarray(mu, np.float64)[..., None]))
  return (integrand if weight is None else integrand * weight(z)) @ w


def tau_exact(t: np.ndarray, vocab_size: int) -> np.ndarray:
  """The reference's quadrature for tau(t), float64 of t's shape; no spline."""
  if vocab_size < 2:
    raise UsageError(f"vocab_size={vocab_size}: decoding-error time needs at least two "
                     "tokens; check the tokenizer's vocabulary size.")
  t = np.asarray(t, np.float64)
  shift = t / np.maximum(1.0 - t, ONE_MINUS_T_FLOOR)
  q = argmax_probability(shift, vocab_size, QUADRATURE_NODES)
  tau = vocab_size / (vocab_size - 1) * (q - 1.0 / vocab_size)
  # As in the reference: the tilt goes on before the clip, so quadrature error below 0
  # near t = 0 still clips to a short run of zeros (V = 30522), which the inverse table
  # drops as duplicates.
  return np.clip(tau + (t - 1.0) * MONOTONE_SLOPE, 0.0, 1.0)


def _locate(xp, x, breaks):
  """Interval of each x (as scipy PPoly: the last one at the right end), offset in it."""
  interval = xp.clip(xp.searchsorted(breaks, x, side="right") - 1, 0, len(breaks) - 2)
  return interval, x - breaks[interval]


def _piecewise_cubic(xp, x, breaks, coefficients):
  """A cubic spline (scipy `.x`, `.c`) at x of any shape, for xp = numpy or jax.numpy."""
  interval, dx = _locate(xp, x, breaks)
  c = coefficients[:, interval]
  return ((c[0] * dx + c[1]) * dx + c[2]) * dx + c[3]


def _cubic_slope(xp, x, breaks, coefficients):
  """Derivative of `_piecewise_cubic` with respect to x."""
  interval, dx = _locate(xp, x, breaks)
  c = coefficients[:, interval]
  return (3.0 * c[0] * dx + 2.0 * c[1]) * dx + c[2]


def _unit_map(xp, x, breaks, coefficients):
  """One of the two splines, [0, 1] -> [0, 1]: input and output clipped, 1 sent to 1."""
  x = xp.clip(x, 0.0, 1.0)
  y = _piecewise_cubic(xp, x, breaks, coefficients)
  # Both maps fix 1 (tau(1) = 1 and t(1) = 1 are table entries). In float32 the last
  # several tau breakpoints round to 1, and the spline alone would answer t(1) = 0.9999.
  return xp.clip(xp.where(x >= 1.0, 1.0, y), 0.0, 1.0)


def _graph_float(x):
  """x as a jax array of float32, or of a wider float type if x has one."""
  x = jnp.asarray(x)
  return x.astype(jnp.result_type(x.dtype, jnp.float32))


# eq=False: identity equality and hashing, so a schedule (one per V from get_schedule)
# can be a static argument of jit even though it holds arrays.
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """tau <-> t splines for one vocabulary size.

  `t_breaks` [n], `t_coefficients` [4, n - 1]: the t -> tau spline; `tau_breaks` [m],
  `tau_coefficients` [4, m - 1]: the tau -> t spline (scipy `CubicSpline.x`, `.c`).
  Inputs and outputs are clipped to [0, 1].
  """
  vocab_size: int
  t_breaks: np.ndarray
  t_coefficients: np.ndarray
  tau_breaks: np.ndarray
  tau_coefficients: np.ndarray

  def tau(self, t):
    """In-graph t -> tau, any shape; float32 in, float32 out."""
    t = _graph_float(t)
    return _unit_map(jnp, t, jnp.asarray(self.t_breaks, t.dtype),
                     jnp.asarray(self.t_coefficients, t.dtype))

  def t(self, tau):
    """In-graph tau -> t, any shape; float32 in, float32 out.

    Float32 tau cannot resolve the last ~1e-7 below 1, which holds t from about 0.9 to
    1; there this differs from `t_host` by up to ~1e-3.
    """
    tau = _graph_float(tau)
    return _unit_map(jnp, tau, jnp.asarray(self.tau_breaks, tau.dtype),
                     jnp.asarray(self.tau_coefficients, tau.dtype))

  def dtau_dt(self, t):
    """In-graph derivative of the t -> tau spline at t (clipped to [0, 1]), any shape.

    Equals jax.grad of `tau` wherever t and tau(t) lie strictly inside (0, 1); elsewhere
    the clips zero (or, at a tie, halve) that gradient, e.g. on the run at t ~ 0 where
    the spline dips below 0, or where float32 tau rounds to 1.
    """
    t = jnp.clip(_graph_float(t), 0.0, 1.0)
    return _cubic_slope(jnp, t, jnp.asarray(self.t_breaks, t.dtype),
                        jnp.asarray(self.t_coefficients, t.dtype))

  def tau_host(self, t) -> np.ndarray:
    """Float64 numpy t -> tau, for time grids built on the host."""
    return _unit_map(np, np.asarray(t, np.float64), self.t_breaks, self.t_coefficients)

  def t_host(self, tau) -> np.ndarray:
    """Float64 numpy tau -> t, for time grids built on the host."""
    return _unit_map(np, np.asarray(tau, np.float64), self.tau_breaks,
                     self.tau_coefficients)


@functools.lru_cache(maxsize=None)
def get_schedule(vocab_size: int) -> Schedule:
  """The reference's tables for this vocabulary size, built once per process."""
  t = np.linspace(0.0, 1.0, TABLE_POINTS)
  tau = tau_exact(t, vocab_size)
  forward = CubicSpline(t, tau)
  # A stable sort keeps the smallest t for each repeated tau, so tau = 0 maps to t = 0.
  order = np.argsort(tau, kind="stable")
  tau_unique, first = np.unique(tau[order], return_index=True)
  inverse = CubicSpline(tau_unique, t[order][first])
  return Schedule(vocab_size, forward.x, forward.c, inverse.x, inverse.c)
