"""Flash attention with the soft cap inside the kernel: a Pallas GPU (Triton) kernel.

For q, k, v [B, L, H, Dh] it computes softmax(cap tanh(q k^T / (cap sqrt(Dh)))) v one block
of queries at a time, over blocks of keys with a running max and sum, so the [L, L] scores
are never stored. The backward pass recomputes them per block from q, k and the saved
logsumexp: with t = tanh(s / cap) and P the probabilities, dS = P (dP - rowsum(dO O)) and
the raw scores' gradient is dS (1 - t^2). The soft cap bounds the scores in [-cap, cap].

Off GPU the kernels run in Pallas's interpret mode, which is how the tests compare them
with the plain path (flmjax/models/dit.py) on a CPU.
"""

import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

BLOCK = 64  # queries and keys per block; L must be a multiple


def _scores(q, k, scale: float, cap: float):
  """(capped scores, their slope d capped / d raw or None) of a block, float32."""
  raw = plgpu.dot(q, k, trans_b=True) * scale
  if not cap:
    return raw, None
  t = jnp.tanh(raw / cap)
  return cap * t, 1 - t * t


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, cap, seq_len):
  q = q_ref[...]

  def body(j, carry):
    top, total, acc = carry
    keys = pl.ds(j * BLOCK, BLOCK)
    s, _ = _scores(q, k_ref[keys, :], scale, cap)
    new_top = jnp.maximum(top, s.max(axis=-1))
    p = jnp.exp(s - new_top[:, None])
    rescale = jnp.exp(top - new_top)
    acc = acc * rescale[:, None] + plgpu.dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return new_top, total * rescale + p.sum(axis=-1), acc

  rows, dim = q.shape
  top, total, acc = jax.lax.fori_loop(
      0, seq_len // BLOCK, body,
      (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
       jnp.zeros((rows, dim), jnp.float32)))
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = top + jnp.log(total)


def _grad_scores(q, k, v, do, lse, delta, scale, cap):
  """P and the raw scores' gradient dS (1 - t^2) of a (queries, keys) block."""
  s, slope = _scores(q, k, scale, cap)
  p = jnp.exp(s - lse[:, None])
  ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
  return p, ds if slope is None else ds * slope


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale,
                cap, seq_len):
  k, v = k_ref[...], v_ref[...]

  def body(i, carry):
    dk, dv = carry
    queries = pl.ds(i * BLOCK, BLOCK)
    q, do = q_ref[queries, :], do_ref[queries, :]
    p, ds = _grad_scores(q, k, v, do, lse_ref[queries], delta_ref[queries], scale, cap)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True) * scale
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, seq_len // BLOCK, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, cap,
               seq_len):
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(j * BLOCK, BLOCK)
    k = k_ref[keys, :]
    _, ds = _grad_scores(q, k, v_ref[keys, :], do, lse, delta, scale, cap)
    return dq + plgpu.dot(ds.astype(k.dtype), k) * scale

  dq = jax.lax.fori_loop(0, seq_len // BLOCK, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(batch, heads, seq_len, dim):
  """BlockSpecs over the grid (batch, heads, block): a block of rows, all rows, and the
  per-row vectors (a block, all)."""
  block = pl.BlockSpec((None, None, BLOCK, dim), lambda b, h, i: (b, h, i, 0))
  whole = pl.BlockSpec((None, None, seq_len, dim), lambda b, h, i: (b, h, 0, 0))
  row_block = pl.BlockSpec((None, None, BLOCK), lambda b, h, i: (b, h, i))
  row_whole = pl.BlockSpec((None, None, seq_len), lambda b, h, i: (b, h, 0))
  return block, whole, row_block, row_whole


def _call(kernel, q, in_specs, out_specs, out_shape, interpret):
  """The kernel over the grid (batch, heads, block), on GPUs through Triton: Triton's
  compiler parameters select it (JAX's default for pallas_call on GPUs is Mosaic GPU)."""
  batch, heads, seq_len, _ = q.shape
  return pl.pallas_call(kernel, grid=(batch, heads, seq_len // BLOCK), in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                        compiler_params=plgpu.CompilerParams())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, cap: float, interpret: bool):
  return _flash_forward(q, k, v, cap, interpret)[0]


def _flash_forward(q, k, v, cap, interpret):
  batch, heads, seq_len, dim = q.shape
  block, whole, row_block, _ = _specs(batch, heads, seq_len, dim)
  kernel = functools.partial(_forward_kernel, scale=1 / math.sqrt(dim), cap=cap,
                             seq_len=seq_len)
  out, lse = _call(kernel, q, [block, whole, whole], [block, row_block],
                   [jax.ShapeDtypeStruct(q.shape, q.dtype),
                    jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)], interpret)(q, k, v)
  return out, (q, k, v, out, lse)


def _flash_backward(cap, interpret, residuals, d_out):
  q, k, v, out, lse = residuals
  batch, heads, seq_len, dim = q.shape
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  block, whole, row_block, row_whole = _specs(batch, heads, seq_len, dim)
  options = {"scale": 1 / math.sqrt(dim), "cap": cap, "seq_len": seq_len}
  args = (q, k, v, d_out.astype(q.dtype), lse, delta)
  dk, dv = _call(functools.partial(_dkv_kernel, **options), q,
                 [whole, block, block, whole, row_whole, row_whole], [block, block],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype),
                  jax.ShapeDtypeStruct(v.shape, v.dtype)], interpret)(*args)
  dq = _call(functools.partial(_dq_kernel, **options), q,
             [block, whole, whole, block, row_block, row_block], block,
             jax.ShapeDtypeStruct(q.shape, q.dtype), interpret)(*args)
  return dq, dk, dv


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q, k, v, softcap: float, interpret: bool):
  """Soft-capped attention over q, k, v [B, L, H, Dh] (L a multiple of BLOCK) ->
  [B, L, H, Dh]; `interpret` runs the kernels in Pallas's interpret mode."""
  if q.shape[1] % BLOCK:
    raise ValueError(f"flash attention needs L a multiple of {BLOCK}, not {q.shape[1]}")
  heads_first = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
  return jnp.swapaxes(_flash(*heads_first, float(softcap), interpret), 1, 2)
