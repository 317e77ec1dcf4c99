"""The DiT denoiser: shapes, initialisation, caps, rotary, attention paths, sizes."""

import functools
import math
import re

from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # the arrays a VJP keeps, with their source
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize
from flmjax import sharding
from flmjax.models import dit, flash

V, D, L, B = 97, 64, 16, 3


def _model(**kw):
  kw = {"dtype": jnp.float32, **kw}
  return dit.DiT(V, D, 2, 4, 32, rngs=nnx.Rngs(0), **kw)


_perturb = functools.partial(randomize, seed=1)


def _inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (B, L, D)), jax.random.uniform(k2, (B,))


def test_output_shape_and_zero_initial_logits():
  h, tau = _inputs()
  logits = nnx.jit(lambda model: model(h, tau))(_model())
  assert logits.shape == (B, L, V) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)


def test_embedding_init_is_uniform_with_bound_one_over_sqrt_d():
  embed = np.asarray(dit.DiT(4000, D, 1, 4, 32, rngs=nnx.Rngs(0)).vocab_embed[...])
  bound = 1 / math.sqrt(D)
  assert np.abs(embed).max() <= bound and np.abs(embed).max() > 0.99 * bound
  assert abs(embed.var() - bound**2 / 3) < 0.02 * bound**2  # variance of U(-b, b)


def test_linear_layers_start_as_the_references_or_at_zero():
  """PyTorch's Linear init, U(+-1/sqrt(fan_in)) for kernel and bias, except the layers the
  reference zeroes: adaLN, the output layer, the second time embedder's last layer."""
  model = dit.DiT(V, 64, 1, 4, 128, two_time=True, rngs=nnx.Rngs(0))
  block = model.blocks[0]
  for layer, fan_in in [(model.sigma_map.fc1, dit.FREQ_DIM), (model.sigma_map.fc2, 128),
                        (model.sigma_map_prime.fc1, dit.FREQ_DIM), (block.mlp_in, 64),
                        (block.mlp_out, 4 * 64), (block.attn_qkv, 64)]:
    bound = 1 / math.sqrt(fan_in)
    for param in (layer.kernel, layer.bias) if layer.bias is not None else (layer.kernel,):
      values = np.asarray(param[...])
      assert 0.9 * bound < np.abs(values).max() <= bound
  for layer in (block.adaln, model.final_adaln, model.output, model.sigma_map_prime.fc2):
    assert not np.asarray(layer.kernel[...]).any() and not np.asarray(layer.bias[...]).any()


def test_learned_loss_weight_is_the_references_network():
  """w(tau) = Linear(GELU(Linear(temb(tau)))) with its own embedder temb (Linear(256, cond)
  -> SiLU -> Linear(cond, cond) of [cos, sin] features), the exact (erf) GELU and a hidden
  width of 128, computed here in NumPy; 0 at init, its last layer zero."""
  model = _model(learned_loss_weight=True)
  tau = np.array([0.0, 0.3, 1.0], np.float32)
  np.testing.assert_array_equal(model.loss_weighting(jnp.asarray(tau)), 0.0)
  net = _perturb(model).loss_weighting
  assert net.fc1.kernel.shape == (32, 128) and net.fc2.kernel.shape == (128, 1)

  def linear(layer, x):
    return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...])
  freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
  features = np.concatenate([np.cos(tau[:, None] * freqs), np.sin(tau[:, None] * freqs)], -1)
  hidden = linear(net.embedder.fc1, features)
  temb = linear(net.embedder.fc2, hidden / (1 + np.exp(-hidden)))
  hidden = linear(net.fc1, temb)
  gelu = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
  expected = linear(net.fc2, gelu)[:, 0]
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(net(jnp.asarray(tau)), expected, rtol=1e-4, atol=1e-5)


def test_output_cap_is_30_tanh_of_the_raw_logits():
  h, tau = _inputs()
  capped = _perturb(_model(), scale=3.0)
  raw = _perturb(_model(output_cap=0.0), scale=3.0)
  raw_logits, capped_logits = raw(h, tau), capped(h, tau)
  assert np.abs(raw_logits).max() > 60  # large enough for the cap to matter
  np.testing.assert_allclose(capped_logits, 30 * np.tanh(raw_logits / 30), rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(capped(h, tau, capped=False), raw_logits, rtol=1e-5, atol=1e-4)


def _numpy_attention(q, k, v, cap):
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if cap:
    scores = cap * np.tanh(scores / cap)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", scores / scores.sum(-1, keepdims=True), v)


def test_soft_capped_attention_matches_its_definition():
  q, k, v = (np.asarray(jax.random.normal(key, (2, 8, 2, 16))) for key in
             jax.random.split(jax.random.key(0), 3))
  q = 40 * q  # raw scores far above the cap of 50
  got = dit.attention(q, k, v, softcap=50.0, impl="plain")
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, 50.0), atol=1e-5)
  assert not np.allclose(got, _numpy_attention(q, k, v, 0.0), atol=1e-3)


@pytest.mark.slow
def test_fused_and_plain_attention_agree_without_cap():
  h, tau = _inputs()
  plain = _perturb(_model(attn_softcap=0.0, attention_impl="plain"))
  fused = _perturb(_model(attn_softcap=0.0, attention_impl="fused"))
  assert dit.attention_path(fused.attention_impl, 0.0, L, D // 4) == "fused"
  np.testing.assert_allclose(fused(h, tau), plain(h, tau), atol=2e-5)


def test_auto_attention_takes_splash_on_tpu_and_flash_on_gpu_when_shapes_allow():
  assert dit.attention_path("auto", 50.0, 128, 64) == "plain"  # on this CPU
  assert dit.attention_path("auto", 0.0, 128, 64) == "fused"
  with sharding.tracing_for("tpu"):
    assert dit.attention_path("auto", 50.0, 256, 64) == "splash"
    assert dit.attention_path("auto", 50.0, 100, 64) == "plain"  # L not a multiple of 128
    assert dit.attention_path("plain", 50.0, 256, 64) == "plain"
  with sharding.tracing_for("gpu"):
    assert dit.attention_path("auto", 50.0, 1024, 64) == "flash"
    assert dit.attention_path("auto", 50.0, 128, 16) == "flash"
    assert dit.attention_path("auto", 0.0, 1024, 64) == "fused"
    assert dit.attention_path("auto", 50.0, 96, 64) == "plain"  # L not a multiple of 64
    assert dit.attention_path("auto", 50.0, 1024, 48) == "plain"  # head not a power of 2
    assert dit.attention_path("auto", 50.0, 1024, 8) == "plain"  # head under 16
    assert dit.attention_path("auto", 50.0, 1024, 64, causal=True) == "plain"
    assert dit.attention_path("plain", 50.0, 1024, 64) == "plain"


@pytest.mark.parametrize("impl, causal, dtype", [
    pytest.param("splash", False, "float32", marks=pytest.mark.slow),
    pytest.param("splash", True, "float32", marks=pytest.mark.slow),
    pytest.param("flash", False, "float32", marks=pytest.mark.slow),
    pytest.param("flash", False, "bfloat16", marks=pytest.mark.slow)])
def test_attention_kernels_equal_the_plain_path_values_and_gradients(impl, causal, dtype):
  """The Pallas kernels (TPU splash, GPU flash; interpret mode on this CPU) with the cap
  inside them, against the plain path in float32, at scores far past the cap. In
  bfloat16 (the model's default, and the check launch/gpu_bench.sh runs on a GPU, where
  float32 products may round to TF32) within bfloat16's error: the plain path's own, 2%
  to 3% of the largest value, seen here."""
  q, k, v = (jax.random.normal(key, (1, 128, 2, 16)) for key in
             jax.random.split(jax.random.key(0), 3))
  q = 20 * q
  cotangent = jax.random.normal(jax.random.key(1), q.shape)

  def loss(impl, q, k, v):
    return jnp.sum(cotangent * dit.attention(q, k, v, 50.0, impl, causal).astype(jnp.float32))

  low = [x.astype(dtype) for x in (q, k, v)]
  tolerance = 1e-4 if dtype == "float32" else 0.05
  expected = dit.attention(q, k, v, 50.0, "plain", causal)
  np.testing.assert_allclose(dit.attention(*low, 50.0, impl, causal).astype(jnp.float32),
                             expected, atol=2e-5 if dtype == "float32"
                             else tolerance * np.abs(expected).max())
  got = jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2))(*low)
  expected = jax.grad(functools.partial(loss, "plain"), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(got, expected):
    assert np.abs(e).max() > 0.1
    np.testing.assert_allclose(np.asarray(g, np.float32), e, rtol=tolerance,
                               atol=tolerance * np.abs(e).max())


@pytest.mark.slow
def test_flash_without_a_cap_is_softmax_attention():
  """With cap 0 the kernels skip the tanh (their scores only scaled into base 2): values and
  gradients equal the plain path without a cap, and jax.nn.dot_product_attention's."""
  q, k, v = (jax.random.normal(key, (2, 128, 2, 16)) for key in
             jax.random.split(jax.random.key(4), 3))
  q = 4 * q
  cotangent = jax.random.normal(jax.random.key(5), q.shape)

  def loss(attend, q, k, v):
    return jnp.sum(cotangent * attend(q, k, v))

  paths = [lambda q, k, v: flash.flash_attention(q, k, v, 0.0, interpret=True),
           lambda q, k, v: dit.attention(q, k, v, 0.0, "plain"), jax.nn.dot_product_attention]
  got, *expected = (jax.value_and_grad(functools.partial(loss, attend), argnums=(0, 1, 2))(
      q, k, v) for attend in paths)
  for other in expected:
    np.testing.assert_allclose(got[0], other[0], rtol=1e-5)
    for g, e in zip(got[1], other[1]):
      assert np.abs(e).max() > 0.1
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())


@pytest.mark.slow
@pytest.mark.parametrize("cap", [50.0, 2 * flash.UNSHIFTED_CAP])
def test_flash_at_scores_pinned_to_the_cap_equals_the_plain_path(cap):
  """Rows whose every score sits at +cap or at -cap (the forward kernel's exponentials,
  unshifted up to UNSHIFTED_CAP, are then 2^(+-72) at cap 50), beside ordinary rows: flash
  equals the plain path, values and gradients, with the cap taken unshifted and (above
  UNSHIFTED_CAP) with the running max."""
  u = jnp.zeros(16).at[0].set(1.0)
  k = u + 0.1 * jax.random.normal(jax.random.key(6), (1, 128, 1, 16))
  q = jnp.concatenate([jnp.broadcast_to(40000 * u, (1, 32, 1, 16)),
                       jnp.broadcast_to(-40000 * u, (1, 32, 1, 16)),
                       3 * jax.random.normal(jax.random.key(7), (1, 64, 1, 16))], axis=1)
  v = jax.random.normal(jax.random.key(8), k.shape)
  cotangent = jax.random.normal(jax.random.key(9), q.shape)
  # tanh(s / cap) is 1 in float32 past s / cap = 9
  assert np.abs(jnp.einsum("bqhd,bkhd->bqk", q[:, :64], k) / 4).min() > 20 * cap

  def loss(attend, q, k, v):
    return jnp.sum(cotangent * attend(q, k, v))

  kernel = lambda q, k, v: flash.flash_attention(q, k, v, cap, interpret=True)
  plain = lambda q, k, v: dit.attention(q, k, v, cap, "plain")
  (got, got_grads), (expected, expected_grads) = (
      jax.value_and_grad(functools.partial(loss, attend), argnums=(0, 1, 2))(q, k, v)
      for attend in (kernel, plain))
  np.testing.assert_allclose(kernel(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  for g, e in zip(got_grads, expected_grads):
    assert np.abs(e).max() > 0.01  # dq: the pinned rows' gradients vanish
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())


@pytest.mark.slow
def test_flash_tiles_of_other_shapes_give_the_same_attention():
  """The flash kernels with blocks of other sizes than their loop steps (each side larger
  in turn, with 8 warps and 1 or 3 stages): values and gradients equal the default tiles'."""
  q, k, v = (jax.random.normal(key, (2, 128, 2, 16)) for key in
             jax.random.split(jax.random.key(2), 3))
  q = 20 * q
  cotangent = jax.random.normal(jax.random.key(3), q.shape)
  tiles = flash.Tiles(forward=flash.Tile(128, 32), dkv=flash.Tile(32, 64, 8, 3),
                      dq=flash.Tile(64, 128, 8, 1))

  def loss(tiles, q, k, v):
    out = flash.flash_attention(q, k, v, 50.0, interpret=True, tiles=tiles)
    return jnp.sum(cotangent * out), out

  (_, got), got_grads = jax.value_and_grad(functools.partial(loss, tiles), argnums=(0, 1, 2),
                                           has_aux=True)(q, k, v)
  (_, expected), expected_grads = jax.value_and_grad(
      functools.partial(loss, None), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for g, e in zip(got_grads, expected_grads):
    assert np.abs(e).max() > 0.1
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())


@pytest.mark.slow
def test_attention_kernels_under_a_mesh_run_per_device():
  """On 8 devices, rows over data x fsdp and heads over tensor (shard_map): the model with
  splash or flash attention equals the plain path."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  h = jax.random.normal(jax.random.key(0), (4, 128, D))
  tau = jax.random.uniform(jax.random.key(1), (4,))
  outputs = []
  for impl in ("plain", "splash", "flash"):
    graphdef, params = nnx.split(_perturb(_model(attention_impl=impl)))

    @jax.jit
    def forward(params, h, tau, graphdef=graphdef):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return nnx.merge(graphdef, params)(h, tau)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    outputs.append(forward(params, jax.device_put(h, rows), jax.device_put(tau, rows)))
  for kernel in outputs[1:]:
    np.testing.assert_allclose(kernel, outputs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl, tiles", [("flash", ""),
                                         ("auto", "128x32/8/3,32x128/2/1,64x64/4/2")])
def test_flash_attention_lowers_to_triton_for_cuda(impl, tiles):
  """Exported for CUDA on this CPU (jax.export), the model's flash path (asked for, or
  taken by auto for a GPU) becomes Triton kernels, forward and backward: the Pallas GPU
  lowering accepts the kernels, and the Triton backend is the one chosen (the installed
  JAX's default for pallas_call on GPUs is Mosaic GPU, which cannot lower them). Each
  kernel runs with its tile of model.flash_tiles: L / block programs per (row, head), its
  warps and stages; the cap's tanh and the exponentials (exp2) are PTX's approximate
  instructions, not libdevice's tanhf, expf and exp2f, and the backward kernels' scores
  and slopes fused multiply-adds."""
  graphdef, params = nnx.split(_model(attention_impl=impl, flash_tiles=tiles))
  h = jax.ShapeDtypeStruct((2, 128, D), jnp.float32)
  tau = jax.ShapeDtypeStruct((2,), jnp.float32)

  def loss(params, h, tau):
    return nnx.merge(graphdef, params)(h, tau).sum()

  # JAX from 0.11 reads the target GPU from an abstract mesh's device when none is attached
  h100 = jax.sharding.AbstractMesh(
      (1,) * len(sharding.AXES), sharding.AXES, (jax.sharding.AxisType.Auto,) * 3,
      abstract_device=jax.sharding.AbstractDevice(
          device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"))
  with sharding.tracing_for("gpu"), jax.sharding.use_abstract_mesh(h100):
    exported = jax.export.export(
        jax.jit(jax.grad(loss)), platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(params, h, tau)
  module = exported.mlir_module()
  assert module.count("@__gpu$xla.gpu.triton(") == 3 * 2  # 2 blocks: forward, dk dv, dq
  launched = re.findall(r'grid_z = (\d+) : i32, ir = "[^"]*", name = "_(\w+)_kernel", '
                        r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", module)
  parsed = flash.Tiles.parse(tiles)
  expected = [(str(128 // t.block), kernel, str(t.stages), str(t.warps))
              for kernel in ("forward", "dkv", "dq") for t in [getattr(parsed, kernel)]]
  assert sorted(launched) == sorted(expected * 2)  # 2 blocks
  assert all(asm in module for asm in ("tanh.approx.f32", "ex2.approx.ftz.f32", "fma.rn.f32"))
  assert not {"__nv_tanhf", "__nv_expf", "__nv_exp2f"} & set(re.findall(r"__nv_\w+", module))


def test_fused_attention_with_a_soft_cap_is_refused():
  with pytest.raises(ValueError, match="soft cap"):
    _model(attention_impl="fused")


def test_rotary_is_a_rotation_with_relative_positions():
  x = jax.random.normal(jax.random.key(0), (1, L, 2, 16))
  rotated = dit.rotary(x)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  q = jnp.broadcast_to(x[:, :1], x.shape)  # the same vector at every position
  k = jnp.broadcast_to(x[:, 1:2], x.shape)
  dots = jnp.einsum("bmhd,bnhd->hmn", dit.rotary(q), dit.rotary(k))
  for offset in (0, 3, -5):  # <R_m q, R_n k> depends on m - n only
    diag = jnp.diagonal(dots, offset=offset, axis1=1, axis2=2)
    np.testing.assert_allclose(diag, diag[:, :1] * jnp.ones_like(diag), rtol=1e-4,
                               atol=1e-4)
  np.testing.assert_allclose(dit.rotary(x)[:, 0], x[:, 0])  # position 0: identity


def test_two_time_model_at_init_equals_the_one_time_model():
  h, tau_s = _inputs()
  tau_t = jax.random.uniform(jax.random.key(9), (B,))
  one = _perturb(_model())
  two = _model(two_time=True)
  shared = nnx.state(one)
  nnx.update(two, shared)  # all but sigma_map_prime, whose last layer stays zero
  np.testing.assert_allclose(two(h, tau_s, tau_t), one(h, tau_s), atol=1e-6)
  two.sigma_map_prime.fc2.kernel[...] = jnp.ones_like(two.sigma_map_prime.fc2.kernel[...])
  assert not np.allclose(two(h, tau_s, tau_t), one(h, tau_s), atol=1e-3)


def test_dropout_only_with_a_key():
  h, tau = _inputs()
  model = _perturb(_model(dropout_rate=0.5))
  np.testing.assert_array_equal(model(h, tau), model(h, tau))
  assert not np.allclose(model(h, tau, dropout_rng=jax.random.key(0)), model(h, tau))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keeps_each_element_independently_with_probability_one_minus_rate(rate):
  """Over about 10^6 elements (an odd last axis): the kept share is 1 - rate and the pairs
  at positions 2j and 2j + 1, which share a 32-bit word of random bits, are dropped
  together at rate^2, each within 5 binomial standard deviations; kept elements are
  x / (1 - rate) up to the 2^-16 rounding of the keep probability, dropped ones 0, and the
  mean stays x."""
  x = jnp.full((1024, 4, 257), 2.0)
  y = np.asarray(dit.dropout(x, rate, jax.random.key(3)))
  dropped = y == 0
  n = dropped.size
  assert abs(dropped.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
  both = dropped[..., 0:-1:2] & dropped[..., 1::2]
  assert abs(both.mean() - rate**2) < 5 * math.sqrt(rate**2 * (1 - rate**2) / both.size)
  np.testing.assert_allclose(y[~dropped], 2.0 / (1 - rate), rtol=2**-15)
  assert abs(y.mean() - 2.0) < 5 * 2.0 * math.sqrt(rate / (1 - rate) / n)
  assert dit.dropout(x, rate, None) is x and dit.dropout(x, 0.0, jax.random.key(3)) is x


def _dot_dtypes(jaxpr) -> list:
  """The operand dtypes of every dot_general in a jaxpr, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", None)
      if inner is not None:
        found += _dot_dtypes(getattr(inner, "jaxpr", inner))
  return found


@pytest.mark.slow
def test_bfloat16_blocks_stay_close_to_float32():
  """With dtype bfloat16 the blocks' matmuls (QKV, scores, values, out, the MLP's two) and
  the output layer run in bfloat16, the time MLP and the modulations in float32 (the
  precision policy of flmjax/models/dit.py): the logits move by bfloat16 rounding, not by
  nothing and not by more than 1% of their range (0.2% seen)."""
  h, tau = _inputs()
  exact = _perturb(_model(), scale=0.1)
  fast = _perturb(_model(dtype=jnp.bfloat16), scale=0.1)
  want, got = np.asarray(exact(h, tau)), fast(h, tau)
  assert got.dtype == jnp.float32
  assert 0 < np.abs(np.asarray(got) - want).max() < 0.01 * np.abs(want).max()
  graphdef, state = nnx.split(fast)
  dots = _dot_dtypes(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(h, tau))(state).jaxpr)
  depth = len(fast.blocks)
  assert dots.count(("bfloat16", "bfloat16")) == 6 * depth + 1
  assert dots.count(("float32", "float32")) == 2 + depth + 1  # time MLP, adaLN, final adaLN


def test_mixed_dot_general_derivatives_take_products_in_the_operands_dtype():
  """Its value is lax.dot_general's; in float32 so are its derivatives. With bfloat16
  operands and a float32 result, its backward pass is the bfloat16 product's at the
  cotangent rounded to bfloat16, and its tangent the bfloat16 products' sum."""
  dims = (((1,), (0,)), ((), ()))
  x, w, dx, dw = (jax.random.normal(key, shape) for key, shape in zip(
      jax.random.split(jax.random.key(0), 4), [(8, 32), (32, 16), (8, 32), (32, 16)]))
  g = jax.random.normal(jax.random.key(1), (8, 16))
  exact = functools.partial(jax.lax.dot_general, dimension_numbers=dims)
  mixed = functools.partial(dit.mixed_dot_general, dimension_numbers=dims,
                            preferred_element_type=jnp.float32)
  for got, want in [(jax.jvp(mixed, (x, w), (dx, dw)), jax.jvp(exact, (x, w), (dx, dw))),
                    (jax.vjp(mixed, x, w)[1](g), jax.vjp(exact, x, w)[1](g))]:
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
  xb, wb, dxb, dwb = (a.astype(jnp.bfloat16) for a in (x, w, dx, dw))
  value, tangent = jax.jvp(mixed, (xb, wb), (dxb, dwb))
  assert value.dtype == tangent.dtype == jnp.float32
  np.testing.assert_array_equal(value, jax.lax.dot_general(
      xb, wb, dims, preferred_element_type=jnp.float32))
  np.testing.assert_array_equal(
      tangent, exact(dxb, wb).astype(jnp.float32) + exact(xb, dwb).astype(jnp.float32))
  got = jax.vjp(mixed, xb, wb)[1](g)
  want = jax.vjp(exact, xb, wb)[1](g.astype(jnp.bfloat16))
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b)


def test_bfloat16_blocks_backward_pass_has_no_mixed_products():
  """The gradient of a bfloat16 model multiplies bfloat16 by bfloat16 and float32 by
  float32, never one by the other (XLA would upcast the bfloat16 side and run the product
  in float32): each of the forward pass's 6 x depth + 1 bfloat16 products (see the test
  above) has two bfloat16 products in the backward pass."""
  h, tau = _inputs()
  model = _perturb(_model(dtype=jnp.bfloat16), scale=0.1)
  graphdef, state = nnx.split(model)
  loss = lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(h, tau)))
  dots = _dot_dtypes(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
  assert dots.count(("bfloat16", "bfloat16")) == 3 * (6 * len(model.blocks) + 1)
  assert [d for d in dots if d[0] != d[1]] == []


def test_bfloat16_mlp_rounds_as_under_autocast_and_keeps_no_float32_hidden_array():
  """With bfloat16 blocks the MLP's pre-activation and GELU output are bfloat16, as under
  PyTorch's autocast, the GELU taken in float32 between: value and derivative are float64
  GELU's (tanh form, and its closed-form derivative) at the rounded input, to one bfloat16
  rounding (and 1e-5, float32's cancellation in 1 +- tanh(u) near x = -6), the derivative
  itself bfloat16 values, in reverse and forward mode. Its backward pass keeps no float32
  array of the hidden width 4D (the float32 model keeps several)."""
  x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float32)
  r = np.asarray(x.astype(jnp.bfloat16), np.float64)
  u = math.sqrt(2 / math.pi) * (r + 0.044715 * r ** 3)
  value = 0.5 * r * (1 + np.tanh(u))
  slope = 0.5 * (1 + np.tanh(u)) + 0.5 * r * (1 - np.tanh(u) ** 2) * math.sqrt(2 / math.pi) * (
      1 + 3 * 0.044715 * r ** 2)
  cotangent = jnp.linspace(-1.0, 1.0, 1001, dtype=jnp.bfloat16)

  def value_and_grad(x, g):
    out, pullback = jax.vjp(lambda x: dit.gelu(x, jnp.bfloat16), x)
    return out, pullback(g)[0]
  got, grad = jax.jit(value_and_grad)(x, cotangent)
  assert got.dtype == jnp.bfloat16 and grad.dtype == jnp.float32
  # the derivative rounded to bfloat16, as autocast's GELU backward returns it, also
  # compiled (where XLA may drop a rounding it is free to drop)
  np.testing.assert_array_equal(grad, grad.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), value, rtol=2 ** -8, atol=1e-5)
  want = np.asarray(cotangent, np.float64) * slope
  np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=2 ** -8, atol=1e-5)
  # forward mode too (the Eulerian and Lagrangian objectives' JVPs)
  _, tangent = jax.jvp(lambda x: dit.gelu(x, jnp.bfloat16), (x,), (cotangent.astype(x.dtype),))
  np.testing.assert_allclose(np.asarray(tangent, np.float64), want, rtol=2 ** -8, atol=1e-5)
  np.testing.assert_array_equal(dit.gelu(x), jax.nn.gelu(x, approximate=True))

  h, tau = _inputs()
  kept = {}
  for dtype in (jnp.bfloat16, jnp.float32):
    graphdef, state = nnx.split(_perturb(_model(dtype=dtype), scale=0.1))
    residuals = saved_residuals(lambda s: nnx.merge(graphdef, s)(h, tau).sum(), state)
    kept[dtype] = [a for a, _ in residuals
                   if a.dtype == jnp.float32 and a.shape[1:] == (L, 4 * D)]
  assert kept[jnp.bfloat16] == [] and len(kept[jnp.float32]) >= 2 * 2  # 2 blocks


@pytest.mark.parametrize("vocab, millions", [(30522, 139), (50258, 170)])
def test_small_config_has_the_papers_parameter_count(vocab, millions):
  model = nnx.eval_shape(lambda: dit.DiT(vocab, 768, 12, 12, 128, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(state))
  blocks = sum(x.size for x in jax.tree.leaves(state["blocks"]))
  assert round(blocks / 1e6, 1) == 92.1
  assert abs(total / 1e6 - millions) < 1.0


@pytest.mark.slow
def test_remat_gives_the_same_logits_and_gradients():
  h, tau = _inputs()
  plain, remat = _perturb(_model()), _perturb(_model(remat=True))

  def loss(model, h):
    return jnp.sum(model(h, tau, dropout_rng=jax.random.key(3)) ** 2)

  forward = nnx.jit(lambda model, h: model(h, tau))
  np.testing.assert_allclose(forward(remat, h), forward(plain, h), rtol=1e-6)
  grads = [nnx.jit(nnx.grad(loss))(m, h) for m in (plain, remat)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    # the same float32 arithmetic, fused differently: equal to rounding
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()))

  @jax.jit
  def in_a_scan(graphdef, params):  # as the samplers call it
    model = nnx.merge(graphdef, params)
    return jax.lax.scan(lambda x, _: (model(x, tau)[..., :D], None), h, None, length=2)[0]

  outputs = [in_a_scan(*nnx.split(m)) for m in (plain, remat)]
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
