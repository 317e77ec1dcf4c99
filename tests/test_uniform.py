"""Duo's uniform-state diffusion (flmjax/uniform.py): its forward process, loss and
sampler, and its consistency distillation (DCD), each against Duo's formulas (classes
DUO_BASE, DUO and Distillation in the reference's algo.py; docs/baselines.md) computed here
in float64, a closed form or a brute-force draw."""

import copy
import importlib
import json

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate, special

from conftest import randomize, small_dit, train_config
from configs import owt_dcd
from flmjax import (absorbing, checkpoint, distill, registry, sampling, sharding, train,
                    uniform, validate)
from flmjax.errors import UsageError
from flmjax.models import dit

V = 7


def _usdm_loss(x_theta, x0, j, a, vocab, dalpha=-(1 - absorbing.EPS)):
  """Duo's loss as the reference writes it (DUO_BASE.nll_per_token in its algo.py), in
  float64 (alpha'_t of the log-linear schedule unless given)."""
  xb_theta = vocab * a * x_theta + 1 - a
  xb = vocab * a * (np.arange(vocab) == x0) + 1 - a
  c = (1 - a) / (vocab * a + 1 - a)
  s = np.log(xb_theta).sum() - vocab * np.log(xb_theta[j])
  t1 = vocab * (1 / xb[j] - 1 / xb_theta[j])
  if x0 == j:
    t2 = -c * s + (vocab - 1) * c * np.log(c)
  else:
    t2 = (-s - vocab * a / (1 - a) * (np.log(xb_theta[x0]) - np.log(xb_theta[j]))
          - np.log(c) / c)
  return dalpha / (vocab * a) * (t1 - t2)


def _bayes_posterior(x0, j, a_t, a_s, vocab):
  """q(x_s | x_t = j, x0) by Bayes' rule from the forward kernels: q(x_s | x0) keeps x0
  with probability a_s, and q(x_t | x_s) keeps x_s with a_t / a_s, the kernel that makes
  q(x_s | x0) then q(x_t | x_s) equal q(x_t | x0) (checked here)."""
  def kernel(keep):
    return keep * np.eye(vocab) + (1 - keep) / vocab
  np.testing.assert_allclose(kernel(a_s) @ kernel(a_t / a_s), kernel(a_t), atol=1e-15)
  joint = kernel(a_t / a_s)[:, j] * kernel(a_s)[x0]
  return joint / kernel(a_t)[x0, j]


def _token_loss(logits, xt, x0, t):
  """The bound of the log-linear schedule at times t [B]."""
  return uniform.bound(logits, xt, x0, *uniform.log_linear(t))


def _loss(logits, x0, j, t):
  return float(_token_loss(jnp.asarray(logits, jnp.float32)[None, None],
                                  jnp.array([[j]]), jnp.array([[x0]]),
                                  jnp.array([t], jnp.float32))[0, 0])


def test_corruption_keeps_a_token_or_draws_any_id_uniformly():
  x0 = jnp.zeros((3, 40000), jnp.int32)
  t = jnp.array([0.2, 0.6, 1.0])
  xt = np.asarray(uniform.corrupt(jax.random.key(0), x0, t, V))
  a = absorbing.alpha(np.asarray(t))
  # P(x_t = x0) = alpha + (1 - alpha) / V; every other id (1 - alpha) / V.
  for row, keep in zip(xt, a):
    frequency = np.bincount(row, minlength=V) / row.size
    np.testing.assert_allclose(frequency, [keep + (1 - keep) / V] + [(1 - keep) / V] * 6,
                               atol=0.008)


@pytest.mark.parametrize("vocab", [V, 50258])
@pytest.mark.parametrize("t", [1e-3, 0.3, 0.9])
def test_the_loss_is_duos_expression_as_the_reference_writes_it(vocab, t):
  """The rearranged float32 form against the expression as the reference writes it, in
  float64, for a kept and a changed token, at a spread and a peaked x_theta; at t = 1e-3
  and V = 50258 the written form's terms are about 1e9."""
  rng = np.random.default_rng(0)
  a = float(absorbing.alpha(t))
  for scale in (1.0, 8.0):
    logits = rng.normal(size=vocab) * scale
    x_theta = np.exp(logits - logits.max())
    x_theta /= x_theta.sum()
    for x0, j in ((2, 2), (2, 5)):
      expected = _usdm_loss(x_theta, x0, j, a, vocab)
      np.testing.assert_allclose(_loss(logits, x0, j, t), expected, rtol=1e-4)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_the_loss_is_the_rate_of_kl_between_the_true_and_the_modelled_reverse_step(t):
  """The continuous-time bound: KL(q(x_s | x_t, x0) || q(x_s | x_t, x0 = x_theta)) / (t - s)
  as s -> t, the step's posteriors by Bayes' rule (x0 known) and by Duo's sampler rule (x0 ~
  x_theta), both in float64."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=V)
  x_theta = np.exp(logits) / np.exp(logits).sum()
  dt = 1e-6
  a_t, a_s = absorbing.alpha(t), absorbing.alpha(t - dt)
  for x0, j in ((1, 1), (1, 3)):
    true = _bayes_posterior(x0, j, a_t, a_s, V)
    modelled = _sampler_rule(x_theta, j, a_t, a_s)
    rate = (true * np.log(true / modelled)).sum() / dt
    np.testing.assert_allclose(_loss(logits, x0, j, t), rate, rtol=1e-4)


def _sampler_rule(x_theta, j, a_t, a_s, temperature=1.0):
  """Duo's sampler step (DUO_BASE._compute_posterior in the reference's algo.py) in
  float64, its weights at `temperature` (p^(1/T))."""
  r = a_t / a_s
  weights = ((r * (np.arange(len(x_theta)) == j) + (1 - r) / len(x_theta)) *
             (a_s * x_theta + (1 - a_s) / len(x_theta))) ** (1 / temperature)
  return weights / weights.sum()


def test_the_sampler_step_is_the_posterior_of_the_forward_process():
  """uniform.posterior at a one-hot x0 is Bayes' rule; at a distribution, Duo's sampler rule."""
  a_t, a_s = 0.3, 0.55
  for x0, j in ((1, 1), (1, 3)):
    got = uniform.posterior(jax.nn.one_hot(jnp.array([x0]), V), jnp.array([j]), a_t, a_s)
    np.testing.assert_allclose(got[0], _bayes_posterior(x0, j, a_t, a_s, V), atol=1e-6)
  x_theta = np.random.default_rng(2).dirichlet(np.ones(V))
  got = uniform.posterior(jnp.asarray(x_theta, jnp.float32)[None], jnp.array([4]), a_t, a_s)
  np.testing.assert_allclose(got[0], _sampler_rule(x_theta, 4, a_t, a_s), atol=1e-6)


def test_a_perfect_denoiser_has_zero_loss():
  x0 = jax.random.randint(jax.random.key(0), (4, 16), 0, V)
  for t in (1e-3, 0.5, 1.0):
    times = jnp.full((4,), t)
    xt = uniform.corrupt(jax.random.key(1), x0, times, V)
    sure = 60.0 * jax.nn.one_hot(x0, V)  # x_theta(x0) = 1 - O(e^-60)
    np.testing.assert_allclose(_token_loss(sure, xt, x0, times), 0, atol=1e-4)


def _constant_model(logits):
  """A DiT whose logits are `logits` [V] at every position and time (the zero-initialised
  output layer leaves its bias)."""
  model = dit.DiT(V, 16, 1, 2, 8, output_cap=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  model.output.bias[...] = jnp.asarray(logits, jnp.float32)
  graphdef, params = nnx.split(model)
  return graphdef, nnx.to_pure_dict(params)


@pytest.mark.parametrize("greedy", [False, True])
def test_a_certain_model_is_sampled_exactly_in_k_plus_one_calls(greedy):
  """x_theta = one-hot(3) everywhere: from uniform ids, the last step (a_s = 1, or the
  argmax) leaves every position at 3, after k + 1 network calls."""
  graphdef, params = _constant_model(30.0 * np.eye(V)[3])
  for steps in (1, 4):
    tokens, calls = uniform.tokens(graphdef, params, jax.random.key(steps),
                                   uniform.grid(steps), batch_size=8, seq_len=5,
                                   greedy=greedy)
    assert int(calls) == steps + 1
    np.testing.assert_array_equal(tokens, 3)


def test_one_step_draws_from_the_posterior_then_removes_the_noise():
  """A 1-step sample of a constant model draws every position from Duo's sampler rule from t = 1
  to 1e-5, then removes the noise: `ancestral` by the same rule to a_s = 1, `greedy` by the
  argmax of x_theta. The one-step marginal over uniform starting ids is computed here in
  closed form, at temperature 1 and 0.5; top_p keeps the nucleus of each draw."""
  logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]))
  x_theta = np.exp(logits)
  graphdef, params = _constant_model(logits)
  rows = uniform.grid(1)
  for temperature in (1.0, 0.5):
    tokens, _ = uniform.tokens(graphdef, params, jax.random.key(0), rows, batch_size=2000,
                               seq_len=8, temperature=temperature)
    marginal = np.zeros(V)
    for j in range(V):  # x_1 uniform, x at 1e-5, then x_0
      middle = _sampler_rule(x_theta, j, rows["alpha_t"][0], rows["alpha_s"][0], temperature)
      for k in range(V):
        marginal += middle[k] / V * _sampler_rule(x_theta, k, rows["alpha_t"][1], 1.0,
                                                  temperature)
    frequency = np.bincount(np.asarray(tokens).ravel(), minlength=V) / tokens.size
    np.testing.assert_allclose(frequency, marginal, atol=0.01)
  greedy, _ = uniform.tokens(graphdef, params, jax.random.key(0), rows, batch_size=200,
                             seq_len=8, greedy=True)
  np.testing.assert_array_equal(greedy, 0)
  nucleus, _ = uniform.tokens(graphdef, params, jax.random.key(0), rows, batch_size=200,
                              seq_len=8, top_p=0.05)
  # Each draw is its posterior's most probable id: x_theta's top (0), then 0 kept.
  np.testing.assert_array_equal(nucleus, 0)


def test_temperature_and_top_p_reach_duos_sampler_from_the_config():
  """Through registry.sampler: a top_p of 0.05 or a temperature of 0.01 leaves each draw
  its posterior's most probable id (0 for this model, as above); at 1 and 1 other ids
  are drawn."""
  graphdef, params = _constant_model(np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03,
                                                      0.02])))
  for temperature, top_p, only_zeros in [(1.0, 0.05, True), (0.01, 1.0, True),
                                         (1.0, 1.0, False)]:
    config = train_config()
    config.sample.update(temperature=temperature, top_p=top_p)
    _, sample = registry.sampler("duo", config, 1, 200, seq_len=8, mask_id=-1, bos_id=0)
    tokens = np.asarray(sample(graphdef, params, jax.random.key(0))[0])
    assert (tokens == 0).all() == only_zeros


def test_the_sampler_and_the_objective_feed_the_network_sigma_t():
  """With a network that depends on its time input, the compiled sampler equals the steps
  of 6.2 taken one by one here with sigma_t = -log(1 - (1 - 1e-3) t) on t_i = linspace(1,
  1e-5, k + 1) and the same draws, and the objective equals the token loss of the network
  at sigma_t of the drawn times."""
  graphdef, params = small_dit(V)
  params = nnx.to_pure_dict(params)
  model = nnx.merge(graphdef, params)
  steps, rng = 3, jax.random.key(4)
  got, _ = uniform.tokens(graphdef, params, rng, uniform.grid(steps), batch_size=4,
                          seq_len=6, greedy=True)
  rng_prior, rng_steps = jax.random.split(rng)
  x = jax.random.randint(rng_prior, (4, 6), 0, V, jnp.int32)
  times = np.linspace(1.0, 1e-5, steps + 1)
  for i, key in enumerate(jax.random.split(rng_steps, steps + 1)):
    noise = -np.log(1 - (1 - 1e-3) * times[i])
    probs = jax.nn.softmax(model(model.embed_ids(x), jnp.full((4,), noise, jnp.float32)))
    if i == steps:
      x = jnp.argmax(probs, axis=-1)
      break
    a_t, a_s = 1 - (1 - 1e-3) * times[i], 1 - (1 - 1e-3) * times[i + 1]
    step = np.stack([[_sampler_rule(np.asarray(p, np.float64), j, a_t, a_s)
                      for p, j in zip(row, ids)] for row, ids in zip(probs, np.asarray(x))])
    x = sampling.categorical(key, jnp.asarray(step, jnp.float32))
  np.testing.assert_array_equal(got, x)

  tokens = jax.random.randint(jax.random.key(5), (4, 6), 0, V)
  config = ml_collections.ConfigDict({"model": {"mask_id": -1}})  # Duo has none
  loss, _ = uniform.objective(config, V, train=False)(model, {"tokens": tokens},
                                                      jax.random.key(6), None)
  rng_t, rng_noise, _ = jax.random.split(jax.random.key(6), 3)
  t = absorbing.training_times(rng_t, 4)
  xt = uniform.corrupt(rng_noise, tokens, t, V)
  logits = model(model.embed_ids(xt), -jnp.log(1 - (1 - 1e-3) * t))
  np.testing.assert_allclose(loss, _token_loss(logits, xt, tokens, t).mean(),
                             rtol=1e-5)


def test_the_loss_has_finite_gradients_for_confident_models():
  """A 100-nat gap between logits (x_theta of the other ids about e^-100) at the smallest
  training time and at V 50258, where rho is about 5e7: every gradient finite (each branch
  of the loss is differentiated, the one not taken too)."""
  vocab = 50258
  logits = jnp.zeros((2, 2, vocab)).at[:, :, 7].set(100.0)
  x0 = jnp.array([[7, 3], [7, 3]])
  xt = jnp.array([[7, 7], [5, 3]])
  for t in (1e-3, 0.5, 1.0):
    grad = jax.grad(lambda f: _token_loss(f, xt, x0, jnp.full((2,), t)).sum())(logits)
    assert np.isfinite(np.asarray(grad)).all()


# --- Duo's Gaussian curriculum (docs/baselines.md) --------------------------------------


def _dense_relaxed(rng, x0, g, inv_tau, embed):
  """(softmax(z / tau) @ E, argmax z, the softmax weights) in float64 with eps [B, L, V]
  built whole, z = sqrt(sigmoid(-g)) onehot(x0) + sqrt(sigmoid(g)) eps; the ids of block k
  of 128 draw their eps from normal(fold_in(rng, k)), uniform.py's convention."""
  vocab = embed.shape[0]
  eps = np.concatenate([np.asarray(jax.random.normal(jax.random.fold_in(rng, k),
                                                     (*x0.shape, 128)))
                        for k in range(-(-vocab // 128))], -1)[..., :vocab]
  g = np.asarray(g, np.float64)[:, None, None]
  z = (np.sqrt(special.expit(-g)) * (np.arange(vocab) == np.asarray(x0)[..., None])
       + np.sqrt(special.expit(g)) * eps.astype(np.float64))
  weights = np.exp(z * inv_tau - (z * inv_tau).max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return weights @ np.asarray(embed, np.float64), z.argmax(-1), weights


@pytest.mark.parametrize("inv_tau", [1.0, pytest.param(1000.0, marks=pytest.mark.slow)])
def test_the_relaxed_input_is_softmax_z_over_tau_times_e_in_any_chunking(inv_tau):
  """h and argmax z against the float64 construction with eps built, for chunks of 1, 2
  and 3 blocks of ids (V = 300: 3 chunks, the last partial; 2, the last with a block of
  padding only; 1), and the gradient reaching E as the softmax weights^T dh."""
  vocab, dim = 300, 8
  embed = jax.random.normal(jax.random.key(0), (vocab, dim))
  x0 = jax.random.randint(jax.random.key(1), (3, 5), 0, vocab)
  g = jnp.array([-3.0, -1.0, 0.5])
  rng, dh = jax.random.PRNGKey(3), jax.random.normal(jax.random.key(4), (3, 5, dim))
  h, arg, weights = _dense_relaxed(rng, x0, g, inv_tau, embed)
  grad = np.einsum("blv,bld->vd", weights, np.asarray(dh, np.float64))
  for blocks in (1, 2, 3):
    @jax.jit
    def run(e, blocks=blocks):
      (got, got_arg), vjp = jax.vjp(
          lambda e: uniform.relaxed_input(e, rng, x0, g, inv_tau, blocks), e)
      return got, got_arg, vjp((dh, np.zeros(got_arg.shape, jax.dtypes.float0)))[0]
    got, got_arg, got_grad = run(embed)
    np.testing.assert_allclose(got, h, atol=2e-6)
    np.testing.assert_array_equal(got_arg, arg)
    np.testing.assert_allclose(got_grad, grad, atol=2e-6)


def test_the_relaxed_input_is_the_same_split_over_a_mesh():
  """Rows over 4 data devices and E's ids over 2 tensor devices (as the train step lays
  them out): the same input, argmax and gradient of E as on one device."""
  vocab, dim = 1000, 16
  embed = jax.random.normal(jax.random.key(0), (vocab, dim))
  x0 = jax.random.randint(jax.random.key(1), (8, 12), 0, vocab)
  g, dh = jnp.linspace(-3.0, 0.0, 8), jax.random.normal(jax.random.key(4), (8, 12, dim))

  def run(e, x0, g, dh):
    (h, arg), vjp = jax.vjp(lambda e: uniform.relaxed_input(
        e, jax.random.PRNGKey(3), x0, g, 1000.0, uniform.relaxed_blocks(x0.shape, vocab)), e)
    return h, arg, vjp((dh, np.zeros(arg.shape, jax.dtypes.float0)))[0]

  alone = jax.jit(run)(embed, x0, g, dh)
  mesh = jax.make_mesh((4, 1, 2), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  ids = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tensor", None))
  with sharding.tracing_under(mesh):
    split = jax.jit(run, in_shardings=(ids, rows, rows, rows))(embed, x0, g, dh)
  for a, b in zip(alone, split):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_the_relaxed_argmax_is_the_uniform_process_at_alpha_of_g():
  """P(argmax z = x0) = alpha(g) + (1 - alpha(g)) / V (alpha by quadrature), the other ids
  uniform, at V = 64 over 20k positions per g."""
  vocab = 64
  x0 = jax.random.randint(jax.random.key(0), (400, 100), 0, vocab)
  g = jnp.repeat(jnp.array([-1.0, 0.5]), 200)
  _, xt = uniform.relaxed_input(jnp.zeros((vocab, 4)), jax.random.PRNGKey(1), x0, g, 1e3, 1)
  for rows, value in ((slice(0, 200), -1.0), (slice(200, 400), 0.5)):
    alpha = float(uniform.gaussian_alpha(value, vocab))
    clean = np.asarray(xt[rows] == x0[rows])
    assert abs(clean.mean() - (alpha + (1 - alpha) / vocab)) < 0.013  # 4 sigma
    offset = np.asarray((xt[rows] - x0[rows]) % vocab)[~clean]
    np.testing.assert_allclose(np.bincount(offset, minlength=vocab)[1:] / offset.size,
                               1 / (vocab - 1), atol=0.007)


def _duo_config(**duo):
  return ml_collections.ConfigDict({"model": {"mask_id": -1}, "duo": dict(dict(
      curriculum_end=5, curriculum_start=0, gamma_min=-1.0, gamma_max=1.0,
      tau_log10_start=-1.0, tau_log10_end=-2.0), **duo)})


def test_tau_holds_then_moves_linearly_in_log10_over_the_window():
  cfg = _duo_config(curriculum_start=100, curriculum_end=200).duo
  got = [float(uniform.inverse_tau(jnp.int32(step), cfg)) for step in (0, 100, 150, 200, 300)]
  np.testing.assert_allclose(got, [10, 10, 10 ** 1.5, 100, 100], rtol=1e-6)


def test_the_curriculum_is_the_bound_at_argmax_z_with_gaussian_alpha_then_duo_base():
  """Before duo.curriculum_end: the network at the relaxed input and sigma = -log alpha(g),
  Duo's loss as the reference writes it at x_t = argmax z with alpha(g) by quadrature and
  alpha'_t = (gamma_max - gamma_min) d alpha / d g by central differences, all in float64
  here; from curriculum_end on, and in validation, the discrete-state objective."""
  graphdef, params = small_dit(V)
  model = nnx.merge(graphdef, params)
  config = _duo_config()
  tokens = jax.random.randint(jax.random.key(5), (4, 6), 0, V)
  batch, rng = {"tokens": tokens}, jax.random.PRNGKey(6)
  loss_fn = uniform.objective(config, V)
  rng_t, rng_z, _ = jax.random.split(rng, 3)
  g = -1.0 + 2.0 * np.asarray(absorbing.training_times(rng_t, 4), np.float64)
  alpha = uniform.gaussian_alpha(g, V)
  dalpha = 2.0 * (uniform.gaussian_alpha(g + 1e-5, V) - uniform.gaussian_alpha(g - 1e-5, V)
                  ) / 2e-5
  # log10 tau from -1 to -2 over steps 0 to 5; step 4 is the curriculum's last
  for step, inverse_tau in ((2, 10 ** 1.4), (4, 10 ** 1.8)):
    loss, _ = loss_fn(model, batch, rng, {"step": jnp.int32(step)})
    h, xt, _ = _dense_relaxed(rng_z, tokens, g, inverse_tau, model.vocab_embed[...])
    logits = np.asarray(model(jnp.asarray(h, jnp.float32), jnp.asarray(-np.log(alpha),
                                                                       jnp.float32)), np.float64)
    x_theta = np.exp(logits - logits.max(-1, keepdims=True))
    x_theta /= x_theta.sum(-1, keepdims=True)
    expected = np.mean([[_usdm_loss(x_theta[b, i], int(tokens[b, i]), int(xt[b, i]),
                                    alpha[b], V, dalpha[b]) for i in range(6)]
                        for b in range(4)])
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
  without = _duo_config(curriculum_end=0)
  base = uniform.objective(without, V)(model, batch, rng, None)[0]
  for step in (5, 9):
    np.testing.assert_allclose(loss_fn(model, batch, rng, {"step": jnp.int32(step)})[0], base,
                               rtol=1e-6)
  np.testing.assert_allclose(
      uniform.objective(config, V, train=False)(model, batch, rng, None)[0],
      uniform.objective(without, V, train=False)(model, batch, rng, None)[0], rtol=1e-6)


@pytest.mark.slow
def test_the_curriculum_gradient_is_autodiffs_through_eps_built_whole():
  """The parameters' gradient of the objective (the relaxed input's own backward pass, inside
  the step's lax.cond) against jax.grad of the same loss with eps [B, L, V] built whole and
  h = softmax(z / tau) @ E written out, at V = 300 (three blocks of ids, the last partial),
  in the curriculum; after it, the gradient of the objective without one."""
  vocab = 300
  graphdef, params = small_dit(vocab)
  config = _duo_config()
  tokens = jax.random.randint(jax.random.key(5), (4, 6), 0, vocab)
  batch, rng = {"tokens": tokens}, jax.random.PRNGKey(6)

  def dense(params):
    model = nnx.merge(graphdef, params)
    rng_t, rng_z, rng_dropout = jax.random.split(rng, 3)
    g = -1.0 + 2.0 * absorbing.training_times(rng_t, 4)
    eps = jnp.concatenate([jax.random.normal(jax.random.fold_in(rng_z, k), (4, 6, 128))
                           for k in range(3)], -1)[..., :vocab]
    z = (jnp.sqrt(jax.nn.sigmoid(-g))[:, None, None] * jax.nn.one_hot(tokens, vocab)
         + jnp.sqrt(jax.nn.sigmoid(g))[:, None, None] * eps)
    h = jax.nn.softmax(z * 10 ** 1.4, -1) @ model.vocab_embed[...]  # 1 / tau at step 2 of 5
    sigma_g, slope = uniform.gaussian_table(-1.0, 1.0, vocab)(g)
    logits = model(h, sigma_g, dropout_rng=rng_dropout)
    return uniform.bound(logits, z.argmax(-1), tokens, jnp.exp(-sigma_g),
                         jnp.log(-jnp.expm1(-sigma_g)), 2.0 * slope).mean()

  def fused(config, step):
    loss_fn = uniform.objective(config, vocab)
    return jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch, rng,
                                              {"step": jnp.int32(step)})[0]))(params)

  pairs = [(fused(config, 2), jax.jit(jax.grad(dense))(params)),
           (fused(config, 5), fused(_duo_config(curriculum_end=0), 5))]
  for got, expected in pairs:
    for path, a, b in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(got),
                          jax.tree.leaves(expected)):
      scale = float(np.abs(b).max())
      assert scale > 0, path[0]
      np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.slow
def test_duo_trains_through_its_curriculum_into_the_bound_on_8_devices(tmp_path, prepared):
  """family=duo with duo.curriculum_end=2 of 4 steps, on the 8-device mesh: finite losses
  and gradients on both sides of the switch, resumable."""
  config = train_config(steps=4)
  config.family, config.data.dir = "duo", str(prepared.path.parent)
  config.duo.update(curriculum_end=2, gamma_min=-3.0, gamma_max=0.0)
  train.train(config, str(tmp_path / "duo"))
  rows = [json.loads(line) for line in (tmp_path / "duo/metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 4 and np.isfinite(losses).all()
  assert np.isfinite([r["grad_norm"] for r in rows if "grad_norm" in r]).all()


@pytest.mark.parametrize("field, value, message", [
    ("curriculum_start", 9, "duo.curriculum_start=9 .* must not be after duo.curriculum_end=5"),
    ("gamma_max", -2.0, "duo.gamma_min=-1.0 must be below duo.gamma_max=-2.0"),
    ("curriculum_end", -1, "duo.curriculum_end=-1 must be 0 or more"),
])
def test_duo_curriculum_fields_are_checked(field, value, message):
  config = train_config()
  config.family = "duo"
  config.duo.update(_duo_config().duo)
  validate.validate(config, "train", lambda: 1)
  config.duo[field] = value
  with pytest.raises(UsageError, match=message):
    validate.validate(config, "train", lambda: 1)


def test_a_gamma_range_where_alpha_is_1_is_refused():
  """At V = 50258, the clean id's lead e^{-g/2} = 20 standard deviations at g = -6 makes
  alpha 1 in float64 (log(1 - alpha) = -inf in the bound); Duo's OWT range builds."""
  config = _duo_config(gamma_min=-6.0, gamma_max=-1.85)
  with pytest.raises(UsageError, match=r"duo.gamma_min=-6.0, duo.gamma_max=-1.85: at "
                                       r"V=50258 alpha\(g\) is 1.0 and"):
    uniform.objective(config, 50258)
  uniform.objective(_duo_config(gamma_min=-3.55, gamma_max=-1.85), 50258)
  uniform.objective(config, 50258, train=False)  # validation reads no curriculum


@pytest.mark.parametrize("name, gammas", [("owt_duo", (-3.55, -1.85)),
                                          ("lm1b_duo", (-3.5, -1.75))])
def test_the_duo_configs_are_duos_scripts(name, gammas):
  config = importlib.import_module(f"configs.{name}").get_config()
  validate.validate(config, "train", lambda: 8)
  assert (config.family, config.train.steps, config.batch_size, config.duo.curriculum_end,
          config.duo.curriculum_start, config.duo.tau_log10_start, config.duo.tau_log10_end,
          (config.duo.gamma_min, config.duo.gamma_max)) == (
              "duo", 1_000_000, 512, 500_000, 0, -3.0, -3.0, gammas)


# --- Discrete consistency distillation (DCD, docs/baselines.md) -------------------------


@pytest.mark.parametrize("ids, vocab, table", [
    (30522, 30522, {-3.5: 0.94170, -3.0: 0.63787, -2.5: 0.27372, -2.0: 0.08880,
                    -1.75: 0.04868}),
    (50257, 50258, {-3.55: 0.94547, -3.0: 0.59624, -2.5: 0.23797, -1.85: 0.04932})])
def test_gaussian_alpha_matches_duos_integral_tables_and_adaptive_quadrature(ids, vocab,
                                                                             table):
  """alpha(g) against values read from Duo's bert and gpt2 integral tables (5 digits,
  read at the nearest of 10^5 points: up to 2e-5 off), and against P(g) integrated here
  by adaptive quadrature."""
  g = np.array(list(table))
  got = uniform.gaussian_alpha(g, vocab, ids)
  np.testing.assert_allclose(got, list(table.values()), atol=2e-5)

  np.testing.assert_allclose(
      got, [(vocab * _probability(x, ids) - 1) / (vocab - 1) for x in g], atol=3e-6)


def _probability(g, ids):
  """P(g) = E_{y ~ N(e^{-g/2}, 1)} Phi(y)^(ids - 1) by adaptive quadrature."""
  mu = np.exp(-g / 2)
  return integrate.quad(lambda y: np.exp(-(y - mu) ** 2 / 2 + (ids - 1) * special.log_ndtr(
      y)) / np.sqrt(2 * np.pi), mu - 12, mu + 12, limit=500, epsabs=1e-14)[0]


@pytest.mark.parametrize("vocab, atol", [(512, 1e-7), (50258, 0.0)])  # 1e-7: alpha to 1e-7
def test_the_gaussian_slope_is_the_derivative_of_alpha_and_the_tables_interpolate_both(vocab,
                                                                                     atol):
  """d alpha / d g against central differences (h = 1e-4) of alpha(g) by adaptive
  quadrature, and the objectives' table over [-4, -1] against the quadrature at points
  off its grid."""
  g = np.array([-4.0, -3.55, -3.01, -2.5, -1.85, -1.0])
  h = 1e-4
  numeric = np.array([vocab / (vocab - 1) * (_probability(x + h, vocab) - _probability(
      x - h, vocab)) / (2 * h) for x in g])
  np.testing.assert_allclose(uniform.gaussian_slope(g, vocab), numeric, rtol=3e-5)
  assert (numeric < 0).all()  # more noise, fewer clean argmaxes
  sigma, slope = uniform.gaussian_table(-4.0, -1.0, vocab)(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(sigma, -np.log(uniform.gaussian_alpha(g, vocab)), rtol=2e-6,
                             atol=atol)
  np.testing.assert_allclose(slope, numeric, rtol=4e-5)


def _brute_force_argmax(rng, x0, gammas, vocab):
  """argmax_v (a(g) onehot(x0) + b(g) eps)_v for each g, with eps ~ N(0, I_V) built."""
  eps = jax.random.normal(rng, (*x0.shape, vocab))
  onehot = jax.nn.one_hot(x0, vocab)
  return [jnp.argmax(jnp.sqrt(jax.nn.sigmoid(-g)) * onehot + jnp.sqrt(jax.nn.sigmoid(g)) * eps,
                     -1) for g in (g[:, None, None] for g in gammas)]


def test_the_trajectory_draws_the_argmax_of_one_gaussian_path_without_building_it():
  """At V = 5, (x_t, x_s) from `trajectory` against the argmax of z built with its V-sized
  eps: the same joint law of (x_t = x0, x_s = x0, x_t = x_s), the noisy ids uniform over
  the others, and P(x_t = x0) = P(g) = alpha + (1 - alpha) / V."""
  vocab, n = 5, 200_000
  x0 = jax.random.randint(jax.random.key(0), (n // 100, 100), 0, vocab)
  gammas = (jnp.full((n // 100,), 0.5), jnp.full((n // 100,), -1.0))
  fast = uniform.trajectory(jax.random.key(1), x0, gammas, vocab)
  slow = _brute_force_argmax(jax.random.key(2), x0, gammas, vocab)

  def law(x_t, x_s):
    clean_t, clean_s, same = x_t == x0, x_s == x0, x_t == x_s
    return np.array([float(jnp.mean(c)) for c in (
        clean_t & clean_s, ~clean_t & clean_s, ~clean_t & ~clean_s & same,
        ~clean_t & ~clean_s & ~same, clean_t & ~clean_s)])
  np.testing.assert_allclose(law(*fast), law(*slow), atol=0.006)  # 4 sigma of 200k draws
  assert law(*fast)[3:].sum() == 0  # a clean x_t has a clean x_s; noisy ones share an id
  for x, g in zip(fast, (0.5, -1.0)):
    alpha = float(uniform.gaussian_alpha(g, vocab))
    assert abs(float(jnp.mean(x == x0)) - (alpha + (1 - alpha) / vocab)) < 0.005
    offset = np.asarray((x - x0) % vocab)[np.asarray(x != x0)]  # 1..V-1, uniform
    np.testing.assert_allclose(np.bincount(offset, minlength=vocab)[1:] / offset.size,
                               1 / (vocab - 1), atol=0.01)


def _dcd_config(**dcd):
  return ml_collections.ConfigDict({"distill": {"dcd": dict(
      dict(grid=16, round_steps=10, gamma_min=-4.0, gamma_max=-1.0, divergence="kl-bwd"),
      **dcd)}})


@pytest.mark.parametrize("divergence",
                         [pytest.param("kl-bwd", marks=pytest.mark.slow), "kl-fwd"])
def test_the_dcd_loss_is_the_kl_from_the_student_at_t_to_the_teacher_at_s(divergence):
  """The objective at step 25 (round 2: dt = 4 / 16) equals DCD's loss computed here
  in float64 from two different networks: the student at (x_t, -log alpha(g_t)), the
  teacher (the frozen params) at (x_s, -log alpha(g_s)), t = min(t + dt, 1), s = t - dt,
  g = -4 + 3 t; and its gradient reaches the student only."""
  student = randomize(dit.DiT(V, 16, 1, 2, 8, output_cap=0.0, dtype=jnp.float32,
                              rngs=nnx.Rngs(0)))
  teacher = randomize(dit.DiT(V, 16, 1, 2, 8, output_cap=0.0, dtype=jnp.float32,
                              rngs=nnx.Rngs(1)), seed=1)
  frozen = {"params": nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), "step": jnp.int32(25)}
  tokens = jax.random.randint(jax.random.key(5), (4, 6), 0, V)
  objective = uniform.dcd_objective(_dcd_config(divergence=divergence), V, train=False)
  graphdef, params = nnx.split(student, nnx.Param)

  @jax.jit
  def loss_of(params, teacher):
    return objective(nnx.merge(graphdef, params), {"tokens": tokens}, jax.random.key(6),
                     dict(frozen, params=teacher))
  loss, metrics = loss_of(params, frozen["params"])
  assert float(metrics["dt"]) == 0.25

  rng_t, rng_z, _ = jax.random.split(jax.random.key(6), 3)
  t = np.minimum(np.asarray(absorbing.training_times(rng_t, 4), np.float64) + 0.25, 1.0)
  g_t, g_s = -4 + 3 * t, -4 + 3 * (t - 0.25)
  x_t, x_s = uniform.trajectory(rng_z, tokens, (jnp.asarray(g_t, jnp.float32),
                                                jnp.asarray(g_s, jnp.float32)), V)

  def log_probs(model, x, g):
    sigma = -np.log(uniform.gaussian_alpha(g, V))
    return np.asarray(jax.nn.log_softmax(model(model.embed_ids(x), jnp.asarray(
        sigma, jnp.float32))), np.float64)
  log_s, log_t = log_probs(student, x_t, g_t), log_probs(teacher, x_s, g_s)
  p, q = (log_s, log_t) if divergence == "kl-bwd" else (log_t, log_s)
  np.testing.assert_allclose(loss, np.mean(np.sum(np.exp(p) * (p - q), -1)), rtol=1e-4)

  grads = jax.jit(jax.grad(lambda *args: loss_of(*args)[0], argnums=(0, 1)))(
      params, frozen["params"])
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[1])) == 0


def test_the_dcd_step_doubles_every_round():
  cfg = _dcd_config(grid=512, round_steps=10_000).distill.dcd
  got = [float(uniform.dcd_step(jnp.int32(step), cfg)) for step in
         (0, 9_999, 10_000, 20_000, 30_000, 49_999)]
  assert got == [1 / 512, 1 / 512, 1 / 256, 1 / 128, 1 / 64, 1 / 32]


@pytest.mark.slow
def test_dcd_distils_a_duo_run_with_a_teacher_refreshed_every_round(tmp_path, prepared):
  """--mode=distill with distill.objective=dcd on a Duo run (rounds of 2 steps, T = 8): the
  student starts as the Duo run's EMA weights, dt doubles each round, the state's teacher
  is the params at the round's start (also across a resume), and the export is a Duo
  model with Duo's validation bound."""
  config = train_config(steps=2, keep_checkpoints=1)
  config.family, config.data.dir = "duo", str(prepared.path.parent)
  teacher = copy.deepcopy(config)
  duo = jax.tree.map(np.asarray, train.train(config, str(tmp_path / "duo"))["ema"])
  config.teacher_checkpoint = str(tmp_path / "duo")
  config.distill.update(objective="dcd", steps=2, batch_size=0)
  config.distill.dcd.update(round_steps=2, grid=8)
  started = train.distill(config, str(tmp_path / "dcd"))
  # In the first round the state's teacher is the student's start: the Duo run's EMA.
  for a, b in zip(jax.tree.leaves(duo), jax.tree.leaves(started.state["teacher"])):
    np.testing.assert_array_equal(a, b)
  # The Duo run trains on and drops its step 2: the student needs it only to start from.
  teacher.train.steps = 3
  train.train(teacher, str(tmp_path / "duo"))
  assert checkpoint.latest_step(tmp_path / "duo") == 3
  config.distill.steps = 4
  first = train.distill(config, str(tmp_path / "dcd"))  # resumes at step 2
  at_four = jax.tree.map(np.asarray, first.state["params"])
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(at_four), jax.tree.leaves(first.state["teacher"])))
  config.distill.steps = 6
  last = train.distill(config, str(tmp_path / "dcd"))  # resumes at step 4
  for a, b in zip(jax.tree.leaves(at_four), jax.tree.leaves(last.state["teacher"])):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(line) for line in (tmp_path / "dcd/metrics.jsonl").read_text().splitlines()]
  assert [r["dt"] for r in rows if "dt" in r] == [1 / 8, 1 / 8, 2 / 8, 2 / 8, 4 / 8, 4 / 8]
  assert any("valid_loss" in r for r in rows)
  record = checkpoint.read_record(tmp_path / "dcd" / "export")
  assert record["kind"] == "duo" and record["teacher"] == str(tmp_path / "duo")
  # --mode=train in the DCD run's workdir: its state (with a teacher) is refused, not moved
  # aside as unreadable.
  with pytest.raises(UsageError, match=r"checkpoints/6 holds a train state with other "
                     r"arrays than this run's \(\d+ only there, e.g. teacher/.*0 only in"):
    train.train(teacher, str(tmp_path / "dcd"))
  assert checkpoint.latest_step(tmp_path / "dcd") == 6
  assert not (tmp_path / "dcd" / checkpoint.UNREADABLE).exists()


@pytest.mark.parametrize("field, value, message", [
    ("divergence", "kl", "distill.dcd.divergence='kl' is not one of kl-bwd, kl-fwd"),
    ("round_steps", 0, "distill.dcd.round_steps=0 must be positive"),
    ("gamma_min", -1.0, "distill.dcd.gamma_min=-1.0 must be below distill.dcd.gamma_max=-1.0"),
    ("grid", 4, r"the last of distill.steps=10 would take steps dt = 2\^round / grid above 1"),
])
def test_dcd_fields_are_checked(field, value, message):
  config = train_config()
  config.family, config.teacher_checkpoint = "duo", "somewhere"
  config.distill.update(objective="dcd", steps=10)
  config.distill.dcd.update(round_steps=3, grid=8)  # rounds 0..3: dt up to 8 / 8
  validate.validate(config, "distill", lambda: 1)
  config.distill.dcd[field] = value
  with pytest.raises(UsageError, match=message):
    validate.validate(config, "distill", lambda: 1)


def test_the_owt_dcd_config_is_the_recipe_and_runs_on_8_devices():
  config = owt_dcd.get_config()
  config.teacher_checkpoint = "somewhere"
  validate.validate(config, "distill", lambda: 8)
  student = distill.student_config(config)
  assert (student.batch_size, student.train.steps, student.train.learning_rate,
          student.train.b2, student.train.warmup_steps, student.train.ema_decay,
          student.distill.dcd.grid, student.distill.dcd.round_steps) == (
              128, 50_000, 6e-5, 0.999, 500, 0.999, 512, 10_000)
  assert float(uniform.dcd_step(jnp.int32(49_999), student.distill.dcd)) == 1 / 32
  config.distill.objective = "semigroup"  # an FMLM student takes distill.learning_rate, b2
  assert (distill.student_config(config).train.learning_rate,
          distill.student_config(config).train.b2) == (3e-4, 0.95)
