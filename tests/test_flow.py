"""Flow math: stratified times, the FLM loss by hand, latent noise == V-space noise, and
the joint noise of a teacher and a student."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from conftest import randomize
from flmjax import flow, objectives, sharding
from flmjax.models import dit
from flmjax.schedule import get_schedule

V, D, L, B = 97, 32, 8, 4


def test_stratified_uniform_puts_one_draw_in_each_stratum():
  n = 64
  u = np.asarray(flow.stratified_uniform(jax.random.key(3), n))
  np.testing.assert_array_equal(np.floor(np.sort(u) * n), np.arange(n))
  assert not np.all(np.diff(u) > 0)  # permuted, not sorted
  # Each stratum has its own uniform offset (the reference's torch.rand(n)), not one
  # offset shared by all: the positions within the strata are spread over [0, 1).
  within = np.sort(u) * n - np.arange(n)
  assert within.std() > 0.2  # U[0, 1) has std 0.289; a shared offset gives 0


def test_the_parts_of_a_batch_draw_one_time_in_each_of_its_strata():
  """The 4 parts of an accumulated batch of 64 (train.grad_accum), each drawing 16 with
  its own key and its index, take one draw in each of the batch's 64 strata, as one draw
  over the batch does; a part is spread over [0, 1) (every fourth stratum), not a slice."""
  draws = [np.asarray(flow.stratified_uniform(jax.random.key(index), 16, (index, 4)))
           for index in range(4)]
  np.testing.assert_array_equal(np.sort(np.floor(np.concatenate(draws) * 64)), np.arange(64))
  for index, u in enumerate(draws):
    np.testing.assert_array_equal(np.sort(np.floor(u * 64)), index + 4 * np.arange(16))
  # (0, 1), the whole batch: u_i = (r_i / n + i / n) mod 1, permuted, with the same r
  key = jax.random.key(5)
  r = jax.random.uniform(jax.random.split(key)[0], (16,))
  np.testing.assert_array_equal(np.sort(flow.stratified_uniform(key, 16)),
                                np.sort(np.mod(r / 16 + np.arange(16) / 16, 1.0)))


def test_flm_loss_equals_a_hand_computed_cross_entropy():
  """The token mean of -log softmax(logits)[token] over the positions that are not given
  (the denoiser here ignores its input, so only the loss's leaving them out matters)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  tokens = np.array([[0, 4, 2], [1, 1, 3]])
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  expected = []
  for b, l in zip(*np.nonzero(mask)):
    z = logits[b, l].astype(np.float64)
    expected.append(np.log(np.exp(z).sum()) - z[tokens[b, l]])
  embed = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  loss, metrics = flow.flm_loss(lambda h, tau, key: jnp.asarray(logits), embed,
                                jnp.asarray(tokens), jax.random.key(0), get_schedule(5),
                                given=jnp.asarray(mask == 0))
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-6)
  np.testing.assert_allclose(metrics["cross_entropy"], np.mean(expected), rtol=1e-6)
  weighted, _ = flow.flm_loss(lambda h, tau, key: jnp.asarray(logits), embed,
                              jnp.asarray(tokens), jax.random.key(0), get_schedule(5),
                              given=jnp.asarray(mask == 0),
                              loss_weight=lambda tau: 0 * tau + 0.5)
  np.testing.assert_allclose(weighted, np.exp(-0.5) * np.mean(expected) + 0.5, rtol=1e-6)
  # A weight that differs by row, w = 3 tau, on rows of 3 and 1 tokens: the token mean of
  # exp(-w_b) CE + w_b, each row's w counted once per token (not once per row).
  seen = {}

  def by_row(tau):
    seen["w"] = 3 * np.asarray(tau)
    return 3 * tau
  uneven = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  weighted, _ = flow.flm_loss(lambda h, tau, key: jnp.asarray(logits), embed,
                              jnp.asarray(tokens), jax.random.key(0), get_schedule(5),
                              given=jnp.asarray(uneven == 0), loss_weight=by_row)
  assert abs(seen["w"][0] - seen["w"][1]) > 0.1
  terms = []
  for b, l in zip(*np.nonzero(uneven)):
    z = logits[b, l].astype(np.float64)
    ce = np.log(np.exp(z).sum()) - z[tokens[b, l]]
    terms.append(np.exp(-seen["w"][b]) * ce + seen["w"][b])
  np.testing.assert_allclose(weighted, np.mean(terms), rtol=1e-6)
  raw = 40 * logits  # the denoiser's raw logits, capped by the loss at 30 tanh(raw / 30)
  capped = []
  for b, l in zip(*np.nonzero(mask)):
    z = 30 * np.tanh(raw[b, l].astype(np.float64) / 30)
    capped.append(np.log(np.exp(z).sum()) - z[tokens[b, l]])
  loss, _ = flow.flm_loss(lambda h, tau, key: jnp.asarray(raw), embed, jnp.asarray(tokens),
                          jax.random.key(0), get_schedule(5), given=jnp.asarray(mask == 0),
                          cap=30.0)
  np.testing.assert_allclose(loss, np.mean(capped), rtol=1e-6)


def test_capped_cross_entropy_gradient_is_autodiff_of_its_definition():
  """token_cross_entropy's hand-written backward pass against jax.grad of the formula it
  implements, at raw logits large enough for the cap to matter, with a non-uniform
  cotangent, in float32 and bfloat16."""
  rng = np.random.default_rng(1)
  raw = jnp.asarray(rng.normal(scale=40, size=(2, 3, 7)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 7, size=(2, 3)))
  weights = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)

  def definition(x, cap):
    c = 30 * jnp.tanh(x.astype(jnp.float32) / 30) if cap else x.astype(jnp.float32)
    picked = jnp.take_along_axis(c, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(weights * (jax.nn.logsumexp(c, axis=-1) - picked))

  def custom(x, cap):
    return jnp.sum(weights * flow.token_cross_entropy(x, tokens, cap))

  for cap in (30.0, 0.0):
    np.testing.assert_allclose(custom(raw, cap), definition(raw, cap), rtol=1e-6)
    expected = jax.grad(definition)(raw, cap)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(jax.grad(custom)(raw, cap), expected, rtol=1e-5, atol=1e-7)
    half = raw.astype(jnp.bfloat16)
    got = jax.grad(custom)(half, cap)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32),
                               jax.grad(definition)(half, cap).astype(jnp.float32),
                               rtol=1e-2, atol=1e-3)


def test_soft_cross_entropy_and_its_gradients_are_autodiff_of_its_definition():
  """soft_cross_entropy against -sum target log softmax(cap tanh(x / cap)) by autodiff, in
  the logits and in the target (which need not sum to one)."""
  rng = np.random.default_rng(2)
  raw = jnp.asarray(rng.normal(scale=40, size=(2, 3, 7)), jnp.float32)
  target = jnp.asarray(rng.dirichlet(np.ones(7), size=(2, 3)) * 1.3, jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)

  def definition(x, p, cap):
    c = 30 * jnp.tanh(x / 30) if cap else x
    return jnp.sum(weights * -jnp.sum(p * jax.nn.log_softmax(c, axis=-1), axis=-1))

  def custom(x, p, cap):
    return jnp.sum(weights * flow.soft_cross_entropy(x, p, cap))

  for cap in (30.0, 0.0):
    np.testing.assert_allclose(custom(raw, target, cap), definition(raw, target, cap),
                               rtol=1e-5)
    for got, expected in zip(jax.grad(custom, (0, 1))(raw, target, cap),
                             jax.grad(definition, (0, 1))(raw, target, cap)):
      assert np.abs(expected).max() > 0.1
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap, soft, platform", [(30.0, True, "cpu"), (30.0, False, "gpu"), *(
    pytest.param(cap, soft, platform, marks=pytest.mark.slow)
    for cap, soft, platform in ((30.0, False, "cpu"), (30.0, True, "gpu"), (0.0, False, "cpu"),
                                (0.0, True, "cpu"), (0.0, False, "gpu")))])
def test_fused_head_equals_the_output_layer_then_the_cross_entropy(cap, soft, platform):
  """head_cross_entropy against the plain path (logits, then the token or soft cross
  entropy), values and gradients in features, kernel, bias and weights, whatever the
  chunking; exact to float32 rounding in float32, within bfloat16's rounding of the
  cotangent in bfloat16. Soft targets in bfloat16 that do not sum to 1 (as rounded
  distillation targets) are read as they are. V 37, padded inside to 128 columns; traced
  for a CPU (sums over V as products) and for a GPU (as reductions)."""
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(scale=3, size=(16, 37)), jnp.float32)  # logits past the cap
  # mostly negative logits, so that padded columns counted as logits 0 would show
  bias = jnp.asarray(rng.normal(size=(37,)) - 20, jnp.float32)
  if soft:
    probs = rng.dirichlet(np.full(37, 0.3), size=(2, 6)) * rng.uniform(0.9, 1.1, (2, 6, 1))
    targets = jnp.asarray(probs, jnp.bfloat16)
  else:
    targets = jnp.asarray(rng.integers(0, 37, size=(2, 6)))
  weights = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)

  def plain(x, k, b, w, dtype):
    logits = jnp.matmul(x.astype(dtype), k.astype(dtype),
                        preferred_element_type=jnp.float32) + b.astype(dtype)
    cross_entropy = (flow.soft_cross_entropy(logits, targets.astype(jnp.float32), cap)
                     if soft else flow.token_cross_entropy(logits, targets, cap))
    return jnp.sum(w * cross_entropy), cross_entropy

  def with_grads(fn):  # ((weighted sum, CE), gradients) in one compiled call
    with sharding.tracing_for(platform):
      return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))(
          features, kernel, bias, weights)

  for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    expected, expected_grads = with_grads(lambda *a: plain(*a, dtype))
    assert min(np.abs(g).max() for g in expected_grads) > 0.1
    for chunk in (5, 100):  # 3 chunks of 4 tokens; one chunk
      got, grads = with_grads(lambda x, k, b, w: flow.head_cross_entropy(
          x, k, b, targets, w, cap, dtype, chunk))
      np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
      np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-5)
      for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=tolerance, atol=tolerance * np.abs(e).max())
  with pytest.raises(ValueError, match="not differentiable"):
    jax.grad(lambda x: flow.head_cross_entropy(x, kernel, bias, targets, weights, cap,
                                               jnp.float32, 4)[1].sum())(features)


def test_fused_head_keeps_each_devices_rows_under_a_mesh():
  """Chunks are positions of every row, so with the batch split over 8 devices the compiled
  gradient gathers nothing (chunks of flattened tokens would make XLA gather the rows)."""
  mesh = jax.make_mesh((8, 1, 1), sharding.AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  features, tokens = (jax.device_put(a, rows) for a in (
      jnp.ones((8, 32, 16)), jnp.zeros((8, 32), jnp.int32)))
  weights = jax.device_put(jnp.full((8, 32), 1 / 256), rows)

  def loss(features, kernel, bias):
    with sharding.tracing_under(mesh):  # as the train step traces the loss
      return flow.head_cross_entropy(features, kernel, bias, tokens, weights, 30.0,
                                     jnp.float32, 64)[0]
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      features, jnp.ones((16, 64)), jnp.zeros(64)).compile().as_text()
  assert "all-reduce" in hlo and "all-gather" not in hlo


def test_head_argmax_is_the_argmax_of_the_logits_first_among_ties():
  rng = np.random.default_rng(4)
  features = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 29)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(29,)), jnp.float32)
  kernel = kernel.at[:, 7].set(kernel[:, 3])
  tied = bias.at[7].set(bias[3] + 50).at[3].set(bias[3] + 50)  # columns 3 and 7 tie on top
  low = bias - 100  # all logits below the zero logits of a GPU's padded columns
  logits = np.asarray(features) @ np.asarray(kernel) + np.asarray(bias)
  for platform in ("cpu", "gpu"):  # V 29, padded to 128 columns for a GPU
    with sharding.tracing_for(platform):
      for chunk in (1, 5, 12):
        got = flow.head_argmax(features, kernel, tied, jnp.float32, chunk)
        assert got.shape == (3, 4) and got.dtype == jnp.int32
        np.testing.assert_array_equal(got, np.full((3, 4), 3))
      for b in (bias, low):
        np.testing.assert_array_equal(flow.head_argmax(features, kernel, b, jnp.float32, 5),
                                      logits.argmax(-1))


def test_the_head_chunk_holds_512_mib_of_logits_on_gpus_and_128_elsewhere():
  """output_chunk 0: the most tokens whose float32 logits fit in 512 MiB when traced for a
  GPU, 128 MiB for a CPU or a TPU (compile mode); a set output_chunk wins everywhere."""
  config = base.get_config()
  assert objectives.head_chunk(config.model, 50258) == 667  # 2^27 / (4 x 50258) = 667.7
  assert objectives.head_chunk(config.model, 8192) == 4096
  with sharding.tracing_for("tpu"):
    assert objectives.head_chunk(config.model, 50258) == 667
  with sharding.tracing_for("gpu"):
    assert objectives.head_chunk(config.model, 50258) == 2670  # 2^29 / (4 x 50258) = 2670.6
    assert objectives.head_chunk(config.model, 8192) == 16384
    config.model.output_chunk = 48
    assert objectives.head_chunk(config.model, 50258) == 48
  config.model.output_chunk = 0
  assert objectives.head_chunk(config.model, 2**40) == 1  # logits past the budget: 1 token


@pytest.mark.slow
def test_flm_loss_is_the_same_with_the_fused_head():
  """The FLM objective with model.output_head fused and plain: same loss, metrics and
  gradients, learned loss weight included."""
  config = base.get_config()
  config.model.update(width=D, depth=1, heads=4, cond_width=16, dtype="float32",
                      learned_loss_weight=True)
  graphdef, params = nnx.split(randomize(dit.builder(config.model, V)(), scale=0.2))
  batch = {"tokens": jax.random.randint(jax.random.key(1), (B, L), 0, V)}
  results = []
  for head, chunk in (("plain", 0), ("fused", 3)):
    config.model.update(output_head=head, output_chunk=chunk)
    objective = objectives.denoising(config, V)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: objective(nnx.merge(graphdef, p), batch, jax.random.key(2), None),
        has_aux=True))(params)
    results.append((loss, metrics["cross_entropy"], jax.tree.leaves(grads)))
  (expected_loss, expected_ce, expected_grads), (loss, cross_entropy, grads) = results
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(cross_entropy, expected_ce, rtol=1e-5)
  for g, e in zip(grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max() + 1e-7)


def test_the_flm_objective_equals_its_v_space_definition():
  """objectives.denoising (config.noise "vocab", plain head, no dropout) on its own draws
  of tau and noise: x_t = (1 - t) eps + t onehot with eps ~ N(0, I_V) and t = t(tau), the
  network at x_t @ E and tau, and the mean over tokens of -log softmax(30 tanh(logits /
  30))[token]."""
  config = base.get_config()
  config.model.update(width=D, depth=1, heads=4, cond_width=16, dtype="float32",
                      output_head="plain")
  config.noise = "vocab"
  model = randomize(dit.builder(config.model, V)(), scale=0.5)
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  rng = jax.random.key(2)
  loss, _ = jax.jit(lambda: objectives.denoising(config, V, train=False)(
      model, {"tokens": tokens}, rng, None))()

  rng_tau, rng_noise, _ = jax.random.split(rng, 3)
  tau = flow.stratified_uniform(rng_tau, B)
  t = np.asarray(get_schedule(V).t(tau), np.float64)[:, None, None]
  x_t = (1 - t) * np.asarray(jax.random.normal(rng_noise, (B, L, V)), np.float64) + (
      t * np.eye(V)[np.asarray(tokens)])
  logits = np.asarray(model(jnp.asarray(x_t @ np.asarray(model.vocab_embed[...], np.float64),
                                        jnp.float32), tau, capped=False), np.float64)
  capped = 30 * np.tanh(logits / 30)
  assert np.abs(logits).max() > 30  # the cap matters here
  log_probs = capped - np.log(np.exp(capped).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs, np.asarray(tokens)[..., None], -1).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_flm_loss_conditions_on_tau_and_corrupts_at_t_of_tau():
  embed = jax.random.normal(jax.random.key(1), (V, D))
  tokens = jax.random.randint(jax.random.key(2), (B, L), 0, V)
  seen = {}

  def denoiser(h, tau, key):
    seen.update(h=h, tau=tau)
    return jnp.zeros((B, L, V))

  rng = jax.random.key(5)
  flow.flm_loss(denoiser, embed, tokens, rng, get_schedule(V))
  rng_tau, rng_noise, _ = jax.random.split(rng, 3)
  tau = flow.stratified_uniform(rng_tau, B)
  np.testing.assert_allclose(seen["tau"], tau)
  t = get_schedule(V).t(tau)[:, None, None]
  noise = flow.embedded_noise(rng_noise, embed, (B, L))
  np.testing.assert_allclose(seen["h"], (1 - t) * noise + t * embed[tokens], atol=1e-5)


def test_latent_noise_has_covariance_e_transpose_e():
  embed = jax.random.normal(jax.random.key(0), (V, D)) / np.sqrt(D)
  samples = np.asarray(flow.embedded_noise(jax.random.key(1), embed, (200_000,)),
                       np.float64)
  gram = np.asarray(embed, np.float64).T @ np.asarray(embed, np.float64)
  cov = samples.T @ samples / len(samples)
  assert np.abs(cov - gram).max() < 0.03 * np.abs(gram).max()
  assert np.abs(samples.mean(0)).max() < 0.02


def test_gram_gradient_is_the_closed_form():
  embed = jax.random.normal(jax.random.key(0), (V, D))
  weights = jax.random.normal(jax.random.key(1), (D, D))  # not symmetric
  grad = jax.grad(lambda e: jnp.sum(flow.gram(e) * weights))(embed)
  e64, w64 = np.asarray(embed, np.float64), np.asarray(weights, np.float64)
  np.testing.assert_allclose(np.asarray(flow.gram(embed)), e64.T @ e64, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grad), e64 @ (w64 + w64.T), rtol=1e-5, atol=1e-4)


def _random_model(depth=2):
  return randomize(dit.DiT(V, D, depth, 4, 16, rngs=nnx.Rngs(0), dtype=jnp.float32),
                   scale=0.2)


def test_interpolating_embedded_noise_equals_embedding_the_v_space_state():
  model = _random_model()
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  eps = jax.random.normal(jax.random.key(2), (B, L, V))
  t = jnp.array([0.1, 0.5, 0.8, 0.95])
  x_t = flow.interpolate(eps, jax.nn.one_hot(tokens, V), t)
  embed = model.vocab_embed[...]
  h_latent = flow.interpolate(model.embed(eps), embed[tokens], t)
  np.testing.assert_allclose(h_latent, model.embed(x_t), atol=1e-5)
  tau = jnp.array([0.2, 0.4, 0.6, 0.8])
  np.testing.assert_allclose(model(h_latent, tau), model(model.embed(x_t), tau), atol=1e-4)


@pytest.mark.slow
def test_gradients_are_finite_on_both_paths():
  graphdef, params = nnx.split(_random_model(depth=1))
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)

  def loss(params, latent):
    m = nnx.merge(graphdef, params)
    return flow.flm_loss(lambda h, tau, key: m(h, tau), m.vocab_embed[...], tokens,
                         jax.random.key(3), get_schedule(V), latent=latent)[0]

  for latent in (True, False):
    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, latent)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in leaves)
    assert all(np.abs(g).max() > 0 for g in leaves)


def test_velocity_definition():
  x, denoised, t = jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.array([0.5, 0.0])
  np.testing.assert_allclose(flow.velocity(x, denoised, t, 1e-5),
                             [[-1 / (0.5 + 1e-5)] * 3, [-1 / (1 + 1e-5)] * 3], rtol=1e-6)


def test_sparsemax_is_the_euclidean_projection_onto_the_simplex():
  """sparsemax(z) = max(z - theta, 0) with theta the root of sum max(z - theta, 0) = 1, the
  closest point of the simplex to z: by hand for [1, 0.5, -1], and against theta found by
  bisection in float64 on rows with ties, negative entries and one dominant entry, along
  either axis."""
  np.testing.assert_allclose(flow.sparsemax(jnp.array([1.0, 0.5, -1.0])), [0.75, 0.25, 0],
                             atol=1e-7)
  z = np.array(jax.random.normal(jax.random.key(0), (6, 9)), np.float64)
  z[1, :3] = 0.4  # ties
  z[2] *= 0.01  # nearly uniform: every entry kept
  z[3, 0] = 5.0  # one entry takes all
  lo, hi = z.min(-1, keepdims=True) - 1, z.max(-1, keepdims=True)
  for _ in range(100):
    theta = (lo + hi) / 2
    over = np.maximum(z - theta, 0).sum(-1, keepdims=True) > 1
    lo, hi = np.where(over, theta, lo), np.where(over, hi, theta)
  expected = np.maximum(z - (lo + hi) / 2, 0)
  assert (expected[2] > 0).all() and (expected[3] == np.eye(9)[0]).all()
  np.testing.assert_allclose(flow.sparsemax(jnp.asarray(z, jnp.float32)), expected, atol=1e-6)
  np.testing.assert_allclose(flow.sparsemax(jnp.asarray(z.T, jnp.float32), axis=0),
                             expected.T, atol=1e-6)


def test_joint_noise_has_the_joint_covariance():
  e1 = jax.random.normal(jax.random.key(0), (V, 8))
  e2 = e1 + 0.1 * jax.random.normal(jax.random.key(1), (V, 8))
  n1, n2 = flow.joint_embedded_noise(jax.random.key(2), (e1, e2), (100_000,))
  joint = np.concatenate([n1, n2], axis=1).astype(np.float64)
  stacked = np.concatenate([e1, e2], axis=1).astype(np.float64)
  cov = joint.T @ joint / len(joint)
  assert np.abs(cov - stacked.T @ stacked).max() < 0.03 * np.abs(stacked.T @ stacked).max()
  same, again = flow.joint_embedded_noise(jax.random.key(2), (e1, e1), (5,))
  np.testing.assert_allclose(same, again, rtol=1e-4, atol=1e-4)  # one eps, one projection


@pytest.mark.parametrize("latent", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_joint_noise_gradient_is_the_v_space_gradient(latent, offset):
  """For n_S = eps @ E_S, n_T = eps @ E_T: E[(n_S a)(n_T b) + (n_S c)^2] =
  a^T E_S^T E_T b + |E_S c|^2, whose gradient in E_S is E_T b a^T + 2 E_S c c^T; the mean
  per-draw gradient must match it, also where E_S = E_T (a student at initialisation)."""
  keys = jax.random.split(jax.random.key(3), 4)
  e_t = jax.random.normal(keys[0], (V, 6))
  e_s = e_t + offset * jax.random.normal(keys[1], (V, 6))
  a, b, c = jax.random.normal(keys[2], (3, 6))

  def f(e_s, rng):
    n_s, n_t = flow.joint_embedded_noise(rng, (e_s, e_t), (100_000,), latent)
    return jnp.mean((n_s @ a) * (n_t @ b) + (n_s @ c) ** 2)

  grads = [jax.jit(jax.grad(f))(e_s, k) for k in jax.random.split(keys[3], 4)]
  expected = np.outer(e_t @ b, a) + 2 * np.outer(e_s @ c, c)
  np.testing.assert_allclose(np.mean(grads, axis=0), expected,
                             atol=0.03 * np.abs(expected).max())


