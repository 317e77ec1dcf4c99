"""The DiT denoiser of FLM and FMLM (the paper's DiT backbone), in Flax NNX.

The network never sees a V-dimensional input: callers pass `h = x @ E` ([B, L, D], see
`DiT.embed` and flmjax/flow.py), or the rows E[x] of token ids (`DiT.embed_ids`, the
discrete baselines), and it returns V logits per position. Time conditioning is
`c = silu(temb(tau_s))`, or `c = silu(temb(tau_s) + temb2(tau_t))` for the two-time flow
map, whose second embedder starts at zero so the student starts equal to the teacher. The
baselines feed their noise level sigma to the same embedder (docs/baselines.md).

`causal=True` is the autoregressive baseline: causal attention, no time embedder and no
adaLN (block = x + attn(rope(LN(x))), then x + MLP(LN(x))); `decode` runs it one token
at a time over a key/value cache.

Precision: parameters are float32; the input projection, LayerNorms, time MLP and
modulation run in float32; the blocks' matmuls and attention run in `dtype` (bfloat16 by
default) with float32 accumulation, their gradients' products too (mixed_dot_general), the
MLP's hidden activations are held in `dtype` (gelu), and the residual stream stays float32.
Every parameter carries logical axis names (vocab, embed, heads, mlp, cond, freq) that
flmjax/sharding.py maps to mesh axes.
"""

import functools
import math
from typing import Callable

from flax import nnx
import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import ml_collections

from flmjax import flow, sharding
from flmjax.models import flash
from flmjax.sharding import BATCH_AXES, row_shards

FREQ_DIM = 256  # sinusoidal time features
LN_EPS = 1e-5

# PyTorch's default Linear init, as in the reference: the kernel kaiming-uniform with
# a = sqrt(5), i.e. U(+-1/sqrt(fan_in)), and the bias from the same range. The layers the
# reference zeroes (adaLN, the output layer, the student's second time embedding) use zeros.
torch_uniform = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
zeros = nnx.initializers.zeros_init()


def torch_bias(fan_in: int):
  """PyTorch's default Linear bias init: U(+-1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _param(init, *names):
  # Logical names are metadata only (no mesh needed to build the model); sharding.py
  # maps them to mesh axes when the train state is placed.
  return nnx.with_partitioning(init, names, eager_sharding=False)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
  """lax.dot_general, whose derivatives take their products in the operands' dtype.

  With bfloat16 operands and a float32 result (float32 accumulation), plain autodiff would
  make the backward pass's products bfloat16 x float32 (the result's cotangent), which XLA
  runs as float32 products of upcast operands: on an H200 a third of the train step went to
  such products. Here the tangent is the operands' product rounded to their dtype, so the
  cotangent reaches the transposed products in that dtype too, as under PyTorch's autocast.
  """
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                             out_sharding=out_sharding)


@functools.partial(mixed_dot_general.defjvp, symbolic_zeros=True)
def _mixed_dot_general_jvp(dimension_numbers, precision, preferred_element_type, out_sharding,
                           primals, tangents):
  lhs, rhs = primals
  out = mixed_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                          out_sharding)
  product = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers,
                              precision=precision, out_sharding=out_sharding)
  d_lhs, d_rhs = tangents
  zero = jax.custom_derivatives.SymbolicZero
  terms = ([] if isinstance(d_lhs, zero) else [product(d_lhs, rhs).astype(out.dtype)]) + (
      [] if isinstance(d_rhs, zero) else [product(lhs, d_rhs).astype(out.dtype)])
  return out, sum(terms[1:], terms[0])


def gelu(x, dtype=None):
  """GELU (tanh form) of the MLP's pre-activation x, the float32 result of its first product.
  With a narrower block `dtype` (bfloat16), as under PyTorch's autocast, x is rounded to it,
  the function taken in float32 and its output rounded again; the backward pass recomputes
  it from the rounded x, keeps no float32 array of the hidden width [B, L, 4D] and returns
  the derivative rounded to `dtype`, as autocast's GELU backward does."""
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return jax.nn.gelu(x, approximate=True)
  return jax.checkpoint(_rounded_gelu)(x.astype(dtype))


@jax.custom_jvp
def _rounded_gelu(pre):
  return jax.nn.gelu(pre.astype(jnp.float32), approximate=True).astype(pre.dtype)


@_rounded_gelu.defjvp
def _rounded_gelu_jvp(primals, tangents):
  (pre,), (tangent,) = primals, tangents
  # Transposed, the barrier on the tangent falls on the backward pass's derivative, rounded
  # to pre's dtype: without it XLA drops that rounding, sums the bias's gradient from the
  # float32 derivative, and on GPUs writes that float32 [B, L, 4D] array for it.
  value, slope = jax.jvp(lambda p: jax.nn.gelu(p, approximate=True), (pre.astype(jnp.float32),),
                         (jax.lax.optimization_barrier(tangent).astype(jnp.float32),))
  return value.astype(pre.dtype), slope.astype(pre.dtype)


def _linear(d_in, d_out, names, *, rngs, use_bias=True, zero=False, dtype=None):
  """A Linear layer with PyTorch's default init, or all zeros (`zero`); with a `dtype`, its
  matmul runs in it with a float32 result (mixed_dot_general)."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, rngs=rngs, dtype=dtype,
                    preferred_element_type=jnp.float32 if dtype else None,
                    dot_general=mixed_dot_general if dtype else jax.lax.dot_general,
                    kernel_init=_param(zeros if zero else torch_uniform, *names),
                    bias_init=_param(zeros if zero else torch_bias(d_in), names[-1]))


def timestep_embedding(tau: jax.Array, dim: int = FREQ_DIM, max_period: float = 1e4):
  """[cos, sin] features of the time input [B], used raw (FLM's tau in [0, 1]; the
  baselines' sigma_t, up to about 7) -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = tau.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rotary(x: jax.Array, start=0, base: float = 1e4) -> jax.Array:
  """Rotate-half rotary embedding of x [B, L, H, Dh] at positions start, start + 1, ...
  (non-interleaved)."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  positions = start + jnp.arange(x.shape[1], dtype=jnp.float32)
  angles = positions[:, None] * inv_freq[None]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


ATTENTION = ("auto", "plain", "fused", "splash", "flash")
SPLASH_BLOCK = 128  # splash attention's blocks; L must be a multiple
def attention_path(impl: str, softcap: float, seq_len: int, head_dim: int,
                   causal: bool = False, tiles: flash.Tiles | None = None) -> str:
  """The attention path that `impl` (ATTENTION) takes: auto is fused without a soft cap,
  splash on TPU (when L is a multiple of SPLASH_BLOCK), flash on GPU (when the kernels
  with `tiles`, flash.TILES by default, take L and the head size, and not causal), plain
  otherwise."""
  if impl != "auto":
    return impl
  if not softcap:
    return "fused"
  if sharding.target_platform() == "tpu" and seq_len % SPLASH_BLOCK == 0:
    return "splash"
  if (sharding.target_platform() == "gpu" and not causal
      and flash.supports(seq_len, head_dim, tiles)):
    return "flash"
  return "plain"


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, seq_len: int, causal: bool, softcap: float, interpret: bool):
  full = splash.CausalMask if causal else splash.FullMask
  mask = splash.MultiHeadMask([full((seq_len, seq_len)) for _ in range(heads)])
  block = SPLASH_BLOCK
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block,
                            block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Built with concrete arrays even when first asked for inside a trace, since it is
  # cached: a traced array kept in the cache would leak into the next trace.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  attn_logits_soft_cap=softcap or None, interpret=interpret)


def _per_device(kernel, q, k, v):
  """kernel(q, k, v) over [B, L, H, Dh]; under a mesh, on each device's rows and heads
  (shard_map): XLA cannot split a kernel call itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v)
  rows = BATCH_AXES if row_shards(q.shape[0]) > 1 else None
  tensor = "tensor" if q.shape[2] % mesh.shape["tensor"] == 0 else None
  spec = jax.sharding.PartitionSpec(rows, None, tensor, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q, k, v)


def splash_attention(q, k, v, softcap: float, causal: bool = False):
  """Attention over [B, L, H, Dh] by the Pallas TPU splash kernel, the soft cap applied
  inside it (off TPU in Pallas's interpret mode, for tests), per device under a mesh."""
  seq_len, head_dim = q.shape[1], q.shape[3]
  if seq_len % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs L a multiple of {SPLASH_BLOCK}, not {seq_len}")
  interpret = sharding.target_platform() != "tpu"

  def local(q, k, v):
    kernel = _splash_kernel(q.shape[2], seq_len, causal, float(softcap), interpret)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q / math.sqrt(head_dim), k, v))
    return jnp.swapaxes(jax.vmap(kernel)(q, k, v), 1, 2)
  return _per_device(local, q, k, v)


@jax.named_scope("attention")
def attention(q, k, v, softcap: float, impl: str = "plain", causal: bool = False,
              tiles: flash.Tiles | None = None):
  """Attention over [B, L, H, Dh] with scores capped as cap * tanh(s / cap); `causal`
  lets position i see positions <= i only. `impl` (ATTENTION, resolved by attention_path):

  - plain: the scores materialised in float32 and capped by XLA;
  - fused: jax.nn.dot_product_attention (its default, XLA implementation), which has no
    soft cap, so it is only valid with softcap = 0;
  - splash: splash_attention, the cap inside the kernel (TPU);
  - flash: flash.flash_attention, the cap inside the kernel (a Pallas GPU kernel; not
    causal) with `tiles` (flash.TILES by default), per device under a mesh.
  """
  impl = attention_path(impl, softcap, q.shape[1], q.shape[3], causal, tiles)
  if impl == "splash":
    return splash_attention(q, k, v, softcap, causal)
  if impl == "flash":
    if causal:
      raise ValueError("flash attention is not causal; use attention=auto for family=ar")
    interpret = sharding.target_platform() != "gpu"
    return _per_device(
        lambda q, k, v: flash.flash_attention(q, k, v, softcap, interpret, tiles), q, k, v)
  if impl == "fused":
    if softcap:
      raise ValueError("fused attention has no soft cap; use it with attn_softcap=0")
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  # head-major products: XLA:CPU runs them faster from [B, H, L, Dh] than from [B, L, H, Dh]
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  scores = mixed_dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1))),  # [B, H, Lq, Lk]
                             preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  scores = flow.soft_cap(scores, softcap)
  if causal:
    scores = jnp.where(jnp.tril(jnp.ones(scores.shape[-2:], bool)), scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)


def split_batch(x):
  """x [B, ...] constrained to rows over the mesh's batch axes when the caller traces under
  a mesh (sharding.tracing_under, as the train step and the samplers do): with fsdp, XLA
  then gathers the sharded weights rather than the activations."""
  if row_shards(x.shape[0]) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES))


def split_heads(w):
  """w [..., H, Dh] constrained to its heads over the mesh's tensor axis when the caller
  traces under a mesh whose tensor axis (of more than one device) divides them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("tensor", 1) == 1 or w.shape[-2] % mesh.shape["tensor"]:
    return w
  spec = (None,) * (w.ndim - 2) + ("tensor", None)
  return jax.lax.with_sharding_constraint(w, jax.sharding.PartitionSpec(*spec))


def dropout(x, rate: float, rng):
  """Inverted dropout; the identity when rng is None (evaluation) or rate is 0. Each element
  is kept when 16 random bits fall below round((1 - rate) 2^16), kept ones scaled by
  2^16 over that threshold, so the mean stays x: a keep probability within 2^-17 of
  1 - rate for half the random bits (and about half the time) of a float per element."""
  if rng is None or rate == 0:
    return x
  threshold = max(1, round((1 - rate) * 2**16))
  words = jax.random.bits(rng, (*x.shape[:-1], -(-x.shape[-1] // 2)), jnp.uint32)
  bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*x.shape[:-1], -1)
  keep = bits[..., :x.shape[-1]] < threshold
  return jnp.where(keep, x * (2**16 / threshold), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm without bias, in float32, with a learned scale."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, use_bias=False, rngs=rngs,
                              scale_init=_param(nnx.initializers.ones_init(), "embed"))

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32))


class TimeEmbedder(nnx.Module):
  """tau [B] -> sinusoidal features -> Linear -> SiLU -> Linear -> [B, cond]."""

  def __init__(self, cond: int, *, rngs: nnx.Rngs, zero_last: bool = False):
    self.fc1 = _linear(FREQ_DIM, cond, ("freq", "cond"), rngs=rngs)
    self.fc2 = _linear(cond, cond, ("cond", "cond"), rngs=rngs, zero=zero_last)

  def __call__(self, tau):
    return self.fc2(jax.nn.silu(self.fc1(timestep_embedding(tau))))


class LossWeighting(nnx.Module):
  """The optional learned loss weighting: w(tau) [B] from its own time embedder, then
  Linear(cond, 128) -> GELU -> Linear(128, 1), the last zero (w = 0 at first), as the
  reference's. A loss becomes exp(-w) * loss + w per row."""

  def __init__(self, cond: int, *, rngs: nnx.Rngs, hidden: int = 128):
    self.embedder = TimeEmbedder(cond, rngs=rngs)
    self.fc1 = _linear(cond, hidden, ("cond", None), rngs=rngs)
    self.fc2 = _linear(hidden, 1, (None, None), rngs=rngs, zero=True)

  def __call__(self, tau):
    return self.fc2(jax.nn.gelu(self.fc1(self.embedder(tau)), approximate=False))[:, 0]


class Block(nnx.Module):
  """Pre-LN transformer block with adaLN-Zero modulation from the conditioning c, or,
  without `adaln` (the causal baseline), plain residual branches."""

  def __init__(self, dim, heads, cond, mlp_ratio, *, dtype, rngs: nnx.Rngs, adaln=True):
    self.heads, self.dtype = heads, dtype
    self.norm1 = LayerNorm(dim, rngs=rngs)
    self.attn_qkv = _linear(dim, 3 * dim, ("embed", "heads"), use_bias=False, dtype=dtype,
                            rngs=rngs)
    self.attn_out = _linear(dim, dim, ("heads", "embed"), use_bias=False, dtype=dtype,
                            rngs=rngs)
    self.norm2 = LayerNorm(dim, rngs=rngs)
    self.mlp_in = _linear(dim, mlp_ratio * dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.mlp_out = _linear(mlp_ratio * dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.adaln = _linear(cond, 6 * dim, ("cond", "embed"), zero=True, rngs=rngs) \
        if adaln else None

  @jax.named_scope("norms_modulation")
  def _modulation(self, c):
    """(shift, scale, gate) of the attention and of the MLP branch."""
    if self.adaln is None:
      return (0.0, 0.0, 1.0), (0.0, 0.0, 1.0)
    chunks = jnp.split(self.adaln(c), 6, axis=-1)
    return (tuple(x[:, None] for x in chunks[:3]), tuple(x[:, None] for x in chunks[3:]))

  def _qkv(self, x, shift, scale, start=0):
    """q, k, v [B, L, H, Dh] in `dtype`, q and k rotated from position `start`."""
    batch, length, dim = x.shape
    with jax.named_scope("norms_modulation"):
      x = self.norm1(x) * (1 + scale) + shift
    with jax.named_scope("attention"):
      # The kernel's columns are laid out (3, heads, head_dim): all of q, then k, then v.
      # Split by heads over the mesh's tensor axis (its stored split, contiguous columns,
      # would give a device q and part of k): XLA then moves weights, not activations.
      kernel = split_heads(self.attn_qkv.kernel[...].reshape(
          dim, 3, self.heads, dim // self.heads))
      qkv = mixed_dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                              (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      # [B, L, 3, H, Dh] -> q, k, v by a split, whose gradient is one concatenation (taken
      # by index, XLA:CPU built three zero-padded copies and summed them)
      q, k, v = (part.squeeze(2) for part in jnp.split(qkv, 3, axis=2))
      return (rotary(q.astype(self.dtype), start), rotary(k.astype(self.dtype), start),
              v.astype(self.dtype))

  def _mlp(self, x, attn, attn_mod, mlp_mod, dropout_rate, rng):
    """The residual stream after the attention output `attn` [B, L, D] and the MLP."""
    rng_attn, rng_mlp = jax.random.split(rng) if rng is not None else (None, None)
    with jax.named_scope("attention"):
      x = x + attn_mod[2] * dropout(self.attn_out(attn), dropout_rate, rng_attn)
    shift, scale, gate = mlp_mod
    with jax.named_scope("norms_modulation"):
      normed = self.norm2(x) * (1 + scale) + shift
    with jax.named_scope("mlp"):
      hidden = gelu(self.mlp_in(normed), self.dtype)
      return x + gate * dropout(self.mlp_out(hidden), dropout_rate, rng_mlp)

  def __call__(self, x, c, *, softcap, impl, dropout_rate, rng, causal=False, tiles=None):
    """x [B, L, D] float32 residual stream, c [B, cond] -> [B, L, D] float32."""
    attn_mod, mlp_mod = self._modulation(c)
    q, k, v = self._qkv(x, *attn_mod[:2])
    attn = attention(q, k, v, softcap, impl, causal, tiles).reshape(x.shape)
    return self._mlp(x, attn, attn_mod, mlp_mod, dropout_rate, rng)

  def decode(self, x, cache, position):
    """The causal block at one position: x [B, 1, D], cache (k, v) [B, L, H, Dh] holding
    positions < `position` -> (x [B, 1, D], the cache with this position added)."""
    attn_mod, mlp_mod = self._modulation(None)
    q, k, v = self._qkv(x, 0.0, 0.0, position)
    keys, values = (jax.lax.dynamic_update_slice_in_dim(c, new, position, axis=1)
                    for c, new in zip(cache, (k, v)))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    seen = jnp.arange(keys.shape[1]) <= position
    probs = jax.nn.softmax(jnp.where(seen, scores, -jnp.inf), axis=-1).astype(values.dtype)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, values).reshape(x.shape)
    return self._mlp(x, attn, attn_mod, mlp_mod, 0.0, None), (keys, values)


class DiT(nnx.Module):
  """The denoiser: (h = x_t @ E, tau_s[, tau_t]) -> logits [B, L, V] float32."""

  def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, cond: int, *,
               mlp_ratio: int = 4, dropout_rate: float = 0.0, attn_softcap: float = 50.0,
               output_cap: float = 30.0, two_time: bool = False,
               learned_loss_weight: bool = False, attention_impl: str = "auto",
               flash_tiles: str = "", causal: bool = False, remat: bool = False,
               condition_embedding: bool = False, dtype=jnp.bfloat16, rngs: nnx.Rngs):
    if dim % heads or (dim // heads) % 2:
      raise ValueError(f"width {dim} must split into {heads} heads of even size")
    if attention_impl not in ATTENTION:
      raise ValueError(f"attention_impl must be one of {ATTENTION}, not {attention_impl!r}")
    if attention_impl == "fused" and attn_softcap:
      raise ValueError("attention_impl=fused has no soft cap: set attn_softcap=0 or use plain")
    if causal and (attn_softcap or two_time or learned_loss_weight):
      raise ValueError("the causal model has no attention soft cap and no time input")
    self.vocab_size, self.dim, self.remat, self.causal = vocab_size, dim, remat, causal
    self.dropout_rate, self.attn_softcap, self.output_cap = dropout_rate, attn_softcap, output_cap
    self.attention_impl, self.flash_tiles = attention_impl, flash.Tiles.parse(flash_tiles)
    # E, the input projection: kaiming-uniform (a = sqrt(5)) with fan_in = D, as PyTorch
    # initialises a (V, D) parameter: U(+-1/sqrt(D)).
    embed_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-1,
                                                   out_axis=-2)
    self.vocab_embed = nnx.Param(embed_init(rngs.params(), (vocab_size, dim)),
                                 out_sharding=("vocab", "embed"), eager_sharding=False)
    # Added to the input at given positions (flmjax/conditioning.py); zero at first.
    self.condition_embed = nnx.Param(jnp.zeros((dim,)), out_sharding=("embed",),
                                     eager_sharding=False) if condition_embedding else None
    self.sigma_map = None if causal else TimeEmbedder(cond, rngs=rngs)
    self.sigma_map_prime = TimeEmbedder(cond, rngs=rngs, zero_last=True) if two_time else None
    self.loss_weighting = LossWeighting(cond, rngs=rngs) if learned_loss_weight else None
    self.blocks = nnx.List([Block(dim, heads, cond, mlp_ratio, dtype=dtype, rngs=rngs,
                                  adaln=not causal) for _ in range(depth)])
    self.norm_final = LayerNorm(dim, rngs=rngs)
    self.final_adaln = None if causal else _linear(cond, 2 * dim, ("cond", "embed"),
                                                   zero=True, rngs=rngs)
    self.output = _linear(dim, vocab_size, ("embed", "vocab"), zero=True, dtype=dtype,
                          rngs=rngs)

  @property
  def two_time(self) -> bool:
    return self.sigma_map_prime is not None

  def embed(self, x: jax.Array) -> jax.Array:
    """x [..., V] (a noisy one-hot) -> x @ E [..., D], a float32 dense projection."""
    return flow.project(x, self.vocab_embed[...])

  def embed_ids(self, ids: jax.Array) -> jax.Array:
    """Token ids [...] -> their rows E[ids] [..., D] float32."""
    return jnp.take(self.vocab_embed[...], ids, axis=0)

  @jax.named_scope("norms_modulation")
  def conditioning(self, tau_s, tau_t=None):
    """c [B, cond] from tau_s [B] (and tau_t [B] for the two-time flow map: without it,
    a two-time model reads tau_t = tau_s, delta_{s,s}); None for the causal model, which
    has no time input."""
    if self.causal:
      return None
    temb = self.sigma_map(tau_s)
    if self.two_time:
      temb = temb + self.sigma_map_prime(tau_s if tau_t is None else tau_t)
    elif tau_t is not None:
      raise ValueError("this model has one time input; tau_t needs two_time=True")
    return jax.nn.silu(temb)

  def __call__(self, h, tau_s, tau_t=None, *, given=None, dropout_rng=None,
               capped: bool = True):
    """h [B, L, D] = x_t @ E, tau [B] -> logits [B, L, V] float32.

    `given` [B, L] bool marks the given positions of a condition (flmjax/conditioning.py;
    h holds their clean rows E[token]); it adds the condition embedding there, where the
    model has one. `dropout_rng` None means no dropout (evaluation and sampling).
    `capped=False` returns the logits before the output cap, for a loss that caps them
    itself (flow.token_cross_entropy).
    """
    features = self.features(h, tau_s, tau_t, given=given, dropout_rng=dropout_rng)
    if capped:
      return self.output_logits(features)
    with jax.named_scope("output_head"):
      return self.output(features)

  def features(self, h, tau_s, tau_t=None, *, given=None, dropout_rng=None):
    """The output layer's input [B, L, D] float32 (the final norm and modulation done):
    for a loss that applies the output layer itself (flow.head_cross_entropy)."""
    c = self.conditioning(tau_s, tau_t)
    x = h.astype(jnp.float32)
    if given is not None and self.condition_embed is not None:
      x = x + given[..., None] * self.condition_embed[...]
    x = split_batch(x)

    options = {"softcap": self.attn_softcap, "impl": self.attention_impl,
               "dropout_rate": self.dropout_rate, "causal": self.causal,
               "tiles": self.flash_tiles}
    for i, block in enumerate(self.blocks):
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      if self.remat:  # keep only the block's input for the backward pass; recompute the rest
        graphdef, state = nnx.split(block)  # functional, so it works under any transform
        x = jax.checkpoint(lambda state, x, c, rng, graphdef=graphdef: nnx.merge(
            graphdef, state)(x, c, rng=rng, **options))(state, x, c, rng)
      else:
        x = block(x, c, rng=rng, **options)
      x = split_batch(x)
    return self._final(x, c)

  @jax.named_scope("norms_modulation")
  def _final(self, x, c):
    x = self.norm_final(x)
    if c is None:
      return x
    shift, scale = jnp.split(self.final_adaln(c), 2, axis=-1)
    return x * (1 + scale[:, None]) + shift[:, None]

  @jax.named_scope("output_head")
  def output_logits(self, features):
    """The output layer: features [B, L, D] -> capped logits [B, L, V] float32."""
    return flow.soft_cap(self.output(features), self.output_cap)

  def empty_cache(self, batch_size: int, seq_len: int) -> list:
    """The causal model's key/value cache for `decode`: per block (k, v) [B, L, H, Dh]."""
    heads = self.blocks[0].heads
    shape = (batch_size, seq_len, heads, self.dim // heads)
    return [(jnp.zeros(shape, block.dtype), jnp.zeros(shape, block.dtype))
            for block in self.blocks]

  def decode(self, h, cache: list, position) -> tuple[jax.Array, list]:
    """The causal model at one position: h [B, 1, D] (E[token]) and the cache of the
    positions before -> (logits [B, 1, V] float32, the cache with this position)."""
    x, updated = h.astype(jnp.float32), []
    for block, entry in zip(self.blocks, cache):
      x, entry = block.decode(x, entry, position)
      updated.append(entry)
    return self.output_logits(self._final(x, None)), updated


def builder(cfg: ml_collections.ConfigDict | dict, vocab_size: int,
            seed: int = 0) -> Callable[[], DiT]:
  """A function that builds the DiT of a config's `model` section (or its saved dict),
  freshly initialised from `seed`; what the train state's layout and init take."""
  cfg = ml_collections.ConfigDict(dict(cfg))

  def build() -> DiT:
    return DiT(vocab_size, cfg.width, cfg.depth, cfg.heads, cfg.cond_width,
               mlp_ratio=cfg.mlp_ratio, dropout_rate=cfg.dropout,
               attn_softcap=cfg.attn_softcap, output_cap=cfg.output_cap,
               two_time=cfg.two_time, learned_loss_weight=cfg.learned_loss_weight,
               attention_impl=cfg.attention, flash_tiles=cfg.get("flash_tiles", ""),
               causal=cfg.get("causal", False),
               remat=cfg.remat, condition_embedding=cfg.get("condition_embedding", False),
               dtype=jnp.dtype(cfg.dtype), rngs=nnx.Rngs(seed))
  return build


def training_flops_per_token(cfg: ml_collections.ConfigDict, vocab_size: int,
                             seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward) of the `model` section:
  the blocks' and output layer's matmuls (2 per multiply-add) and attention's two L x L
  products. The input projection is a gather in latent form and not counted."""
  d, depth = cfg.width, cfg.depth
  block = 3 * d * d + d * d + 2 * cfg.mlp_ratio * d * d
  forward = 2 * (depth * block + d * vocab_size) + depth * 4 * seq_len * d
  return 3.0 * forward
