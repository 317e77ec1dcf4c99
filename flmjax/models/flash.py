"""Flash attention with the soft cap inside the kernel: a Pallas GPU (Triton) kernel.

For q, k, v [B, L, H, Dh] it computes softmax(cap tanh(q k^T / (cap sqrt(Dh)))) v one block
of queries at a time, over blocks of keys with a running max and sum, so the [L, L] scores
are never stored. The backward pass recomputes them per block from q, k and the saved
logsumexp: with t = tanh(s / cap) and P the probabilities, dS = P (dP - rowsum(dO O)) and
the raw scores' gradient is dS (1 - t^2). The soft cap bounds the scores in [-cap, cap].
The kernels read and write [B, L, H, Dh] in place (a block is rows of one head), so no
transpose surrounds them.

Off GPU the kernels run in Pallas's interpret mode, which is how the tests compare them
with the plain path (flmjax/models/dit.py) on a CPU.
"""

import dataclasses
import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tile:
  """One kernel's rows per program (its block: queries, or keys for dkv) and per step of
  its loop over the other side, and Triton's warps and pipeline stages."""
  block: int = 64
  step: int = 64
  warps: int = 4
  stages: int = 2


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The tiles of the three kernels: the forward pass, dk and dv, dq."""
  forward: Tile = Tile()
  dkv: Tile = Tile()
  dq: Tile = Tile()

  def multiple(self) -> int:
    """The multiple of which L must be."""
    return math.lcm(*(n for t in (self.forward, self.dkv, self.dq) for n in (t.block, t.step)))


TILES = Tiles()


def supports(seq_len: int, head_dim: int) -> bool:
  """Whether the kernels take L (a multiple of TILES.multiple()) and the head size (a power
  of two, at least 16, as Triton's blocks need)."""
  return seq_len % TILES.multiple() == 0 and head_dim >= 16 and not head_dim & (head_dim - 1)


def _scores(q, k, scale: float, cap: float):
  """(capped scores, their slope d capped / d raw or None) of a block, float32."""
  raw = plgpu.dot(q, k, trans_b=True) * scale
  if not cap:
    return raw, None
  t = jnp.tanh(raw / cap)
  return cap * t, 1 - t * t


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, cap, step):
  q = q_ref[...]

  def body(j, carry):
    top, total, acc = carry
    keys = pl.ds(j * step, step)
    s, _ = _scores(q, k_ref[keys, :], scale, cap)
    new_top = jnp.maximum(top, s.max(axis=-1))
    p = jnp.exp(s - new_top[:, None])
    rescale = jnp.exp(top - new_top)
    acc = acc * rescale[:, None] + plgpu.dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return new_top, total * rescale + p.sum(axis=-1), acc

  rows, dim = q.shape
  top, total, acc = jax.lax.fori_loop(
      0, k_ref.shape[0] // step, body,
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
                cap, step):
  k, v = k_ref[...], v_ref[...]

  def body(i, carry):
    dk, dv = carry
    queries = pl.ds(i * step, step)
    q, do = q_ref[queries, :], do_ref[queries, :]
    p, ds = _grad_scores(q, k, v, do, lse_ref[queries], delta_ref[queries], scale, cap)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // step, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, cap, step):
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(j * step, step)
    k = k_ref[keys, :]
    _, ds = _grad_scores(q, k, v_ref[keys, :], do, lse, delta, scale, cap)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, k_ref.shape[0] // step, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _call(kernel, shape, tile, inputs, outputs, interpret, **options):
  """`kernel` over the grid (batch, heads, blocks of tile.block rows) of [B, L, H, Dh] arrays.
  `inputs` and `outputs` name each array's kind: "block" (this program's rows of [B, L, H,
  Dh]), "all" (all rows of its head), "row_block" and "row_all" (the same of [B, H, L]).
  Triton's compiler parameters select Triton (JAX's default for pallas_call on GPUs is
  Mosaic GPU)."""
  batch, seq_len, heads, dim = shape
  block = tile.block
  specs = {
      "block": pl.BlockSpec((None, block, None, dim), lambda b, h, i: (b, i, h, 0)),
      "all": pl.BlockSpec((None, seq_len, None, dim), lambda b, h, i: (b, 0, h, 0)),
      "row_block": pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i)),
      "row_all": pl.BlockSpec((None, None, seq_len), lambda b, h, i: (b, h, 0))}
  return pl.pallas_call(
      functools.partial(kernel, scale=1 / math.sqrt(dim), step=tile.step, **options),
      grid=(batch, heads, seq_len // block), in_specs=[specs[x] for x in inputs],
      out_specs=[specs[kind] for kind, _ in outputs],
      out_shape=[shape_dtype for _, shape_dtype in outputs], interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=tile.warps, num_stages=tile.stages))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, cap: float, tiles: Tiles, interpret: bool):
  return _flash_forward(q, k, v, cap, tiles, interpret)[0]


def _flash_forward(q, k, v, cap, tiles, interpret):
  batch, seq_len, heads, _ = q.shape
  out, lse = _call(_forward_kernel, q.shape, tiles.forward, ["block", "all", "all"],
                   [("block", jax.ShapeDtypeStruct(q.shape, q.dtype)),
                    ("row_block", jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32))],
                   interpret, cap=cap)(q, k, v)
  return out, (q, k, v, out, lse)


def _flash_backward(cap, tiles, interpret, residuals, d_out):
  q, k, v, out, lse = residuals
  d_out = d_out.astype(q.dtype)
  delta = jnp.einsum("blhd,blhd->bhl", out, d_out, preferred_element_type=jnp.float32)
  args = (q, k, v, d_out, lse, delta)
  dk, dv = _call(_dkv_kernel, q.shape, tiles.dkv,
                 ["all", "block", "block", "all", "row_all", "row_all"],
                 [("block", jax.ShapeDtypeStruct(k.shape, k.dtype)),
                  ("block", jax.ShapeDtypeStruct(v.shape, v.dtype))],
                 interpret, cap=cap)(*args)
  dq, = _call(_dq_kernel, q.shape, tiles.dq,
              ["block", "all", "all", "block", "row_block", "row_block"],
              [("block", jax.ShapeDtypeStruct(q.shape, q.dtype))],
              interpret, cap=cap)(*args)
  return dq, dk, dv


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q, k, v, softcap: float, interpret: bool, tiles: Tiles | None = None):
  """Soft-capped attention over q, k, v [B, L, H, Dh] (L a multiple of tiles.multiple())
  -> [B, L, H, Dh]; `interpret` runs the kernels in Pallas's interpret mode. `tiles`
  defaults to TILES."""
  tiles = tiles or TILES
  if q.shape[1] % tiles.multiple():
    raise ValueError(f"flash attention needs L a multiple of {tiles.multiple()}, "
                     f"not {q.shape[1]}")
  return _flash(q, k, v, float(softcap), tiles, interpret)
