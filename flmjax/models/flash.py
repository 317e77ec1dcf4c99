"""Flash attention with the soft cap inside the kernel: a Pallas GPU (Triton) kernel.

For q, k, v [B, L, H, Dh] it computes softmax(cap tanh(q k^T / (cap sqrt(Dh)))) v one block of
queries at a time, over blocks of keys with a running sum (and, without a cap or with one
above UNSHIFTED_CAP, a running max), so the [L, L] scores are never stored. The backward
pass recomputes them per block from q, k and the saved logsumexp: with t = tanh(s / cap) and P
the probabilities, dS = P (dP - rowsum(dO O)) and the raw scores' gradient is dS (1 - t^2).
The soft cap bounds the scores in [-cap, cap]. The kernels read and write [B, L, H, Dh] in
place (a block is rows of one head), so no transpose surrounds them. They work in base 2,
as FlashAttention does: the scores are scaled by log2(e) with the other constants, so that
the exponentials are exp2, and the logsumexp they keep is in base 2; on a GPU the cap's
tanh and the exp2 are PTX's approximate instructions (_scores, _exp2). The tiles of the
three kernels (Tiles: rows per program and per loop step, Triton's warps and stages) are a
setting, model.flash_tiles, and `python -m flmjax.bench --flash_sweep=...` times
candidates.

Off GPU the kernels run in Pallas's interpret mode, with jnp.tanh and jnp.exp2, which is how
the tests compare them with the plain path (flmjax/models/dit.py) on a CPU.
"""

import dataclasses
import functools
import math
import re

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp


_TILE = re.compile(r"(\d+)x(\d+)/(\d+)/(\d+)")


@dataclasses.dataclass(frozen=True)
class Tile:
  """One kernel's rows per program (its block: queries, or keys for dkv) and per step of
  its loop over the other side, and Triton's warps and pipeline stages; written
  BLOCKxSTEP/WARPS/STAGES."""
  block: int = 64
  step: int = 64
  warps: int = 4
  stages: int = 2

  def __str__(self) -> str:
    return f"{self.block}x{self.step}/{self.warps}/{self.stages}"

  @classmethod
  def parse(cls, text: str) -> "Tile":
    """The tile written BLOCKxSTEP/WARPS/STAGES (e.g. 128x64/4/2): block and step powers of
    two from 16 (Triton's blocks), warps a power of two up to 16, at least one stage."""
    found = _TILE.fullmatch(text.strip())
    if not found:
      raise ValueError(f"{text!r} is not a tile BLOCKxSTEP/WARPS/STAGES, e.g. 128x64/4/2")
    tile = cls(*map(int, found.groups()))
    if any(n < 16 or n & (n - 1) for n in (tile.block, tile.step)):
      raise ValueError(f"tile {text!r}: block and step must be powers of two, at least 16")
    if not 1 <= tile.warps <= 16 or tile.warps & (tile.warps - 1) or tile.stages < 1:
      raise ValueError(f"tile {text!r}: warps must be 1, 2, 4, 8 or 16, stages at least 1")
    return tile


KERNELS = ("forward", "dkv", "dq")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The tiles of the three kernels: the forward pass, dk and dv, dq; written as three
  tiles FORWARD,DKV,DQ."""
  forward: Tile = Tile()
  dkv: Tile = Tile()
  dq: Tile = Tile()

  def __str__(self) -> str:
    return ",".join(str(getattr(self, kernel)) for kernel in KERNELS)

  @classmethod
  def parse(cls, text: str) -> "Tiles":
    """Three tiles FORWARD,DKV,DQ (Tile.parse); "" is TILES."""
    if not text.strip():
      return TILES
    parts = text.split(",")
    if len(parts) != len(KERNELS):
      raise ValueError(f"{text!r} is not three tiles FORWARD,DKV,DQ, e.g. "
                       "128x64/4/2,64x64/4/2,64x64/4/2")
    return cls(*map(Tile.parse, parts))

  def multiple(self) -> int:
    """The multiple of which L must be."""
    return math.lcm(*(n for t in (self.forward, self.dkv, self.dq) for n in (t.block, t.step)))


TILES = Tiles()


def takes_head(head_dim: int) -> bool:
  """Whether the kernels take the head size: a power of two, at least 16, as Triton's
  blocks need."""
  return head_dim >= 16 and not head_dim & (head_dim - 1)


def supports(seq_len: int, head_dim: int, tiles: Tiles | None = None) -> bool:
  """Whether the kernels with `tiles` (TILES by default) take L (a multiple of
  tiles.multiple()) and the head size."""
  return seq_len % (tiles or TILES).multiple() == 0 and takes_head(head_dim)


LOG2E = math.log2(math.e)


def _fma(a, b, c, approx: bool, negate: bool = False):
  """a b + c (-a b + c with `negate`), broadcast; with `approx` (on a GPU) one fma.rn.f32:
  the kernels' PTX keeps each product, sum and negation apart (`.rn`), which ptxas does
  not fuse."""
  if not approx:
    return (-a if negate else a) * b + c
  shape = jnp.broadcast_shapes(*map(jnp.shape, (a, b, c)))
  result, = plgpu.elementwise_inline_asm(
      "{ .reg .f32 n; neg.f32 n, $1; fma.rn.f32 $0, n, $2, $3; }" if negate
      else "fma.rn.f32 $0, $1, $2, $3;",
      args=[jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape) for x in (a, b, c)],
      constraints="=f,f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
  return result


def _scores(q, k, scale: float, cap: float, approx: bool, shift=None):
  """(capped scores times log2(e), less `shift` [rows] if given, and their slope
  d capped / d raw, or None without a cap) of a block, float32: exp2 of the first is exp
  of the capped scores (less the shift). A multiplication by a constant, one fused
  multiply-add for each of the two and, with `approx` (on a GPU), PTX's tanh.approx.f32,
  one special-function instruction (relative error about 2^-11, as FlashAttention's soft
  cap computes it), where jnp.tanh, exp and a division by the cap are libdevice routines
  of many instructions each."""
  raw = plgpu.dot(q, k, trans_b=True)
  shift = 0.0 if shift is None else -shift[:, None]
  if not cap:
    return _fma(raw, scale * LOG2E, shift, approx), None
  x = raw * (scale / cap)
  t = plgpu.approx_tanh(x) if approx else jnp.tanh(x)
  return _fma(cap * LOG2E, t, shift, approx), _fma(t, t, 1.0, approx, negate=True)


def _exp2(x, approx: bool):
  """2^x; with `approx` (on a GPU) PTX's ex2.approx.ftz.f32, one special-function
  instruction, as FlashAttention's exponentials compile. jnp.exp2 lowers to ex2.approx.f32,
  which ptxas surrounds with a range check and two multiplications to keep results below
  2^-126 (subnormal); here they flush to zero, probabilities that add nothing to a float32
  sum of 1."""
  if not approx:
    return jnp.exp2(x)
  result, = plgpu.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
  return result


# The largest cap at which the forward kernel takes exp2 of the capped scores unshifted:
# |s| <= cap log2(e) <= 87, so each exp2 is a normal float32 in [2^-87, 2^87] and a row's
# sum over L < 2^32 keys stays far below float32's 2^128.
UNSHIFTED_CAP = 60.0


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, cap, step, approx):
  q = q_ref[...]
  # With a cap the scores are bounded (UNSHIFTED_CAP): their exp2 needs no running max to
  # stay in range, which saves each step the rows' max and the rescaling of the sum and
  # the output. The shift `top` then stays 0.
  running_max = not 0 < cap <= UNSHIFTED_CAP

  def body(j, carry):
    top, total, acc = carry
    keys = pl.ds(j * step, step)
    s, _ = _scores(q, k_ref[keys, :], scale, cap, approx)
    if running_max:
      new_top = jnp.maximum(top, s.max(axis=-1))
      rescale = _exp2(top - new_top, approx)
      top, total, acc = new_top, total * rescale, acc * rescale[:, None]
    p = _exp2(s - top[:, None], approx) if running_max else _exp2(s, approx)
    acc = acc + plgpu.dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return top, total + p.sum(axis=-1), acc

  rows, dim = q.shape
  top, total, acc = jax.lax.fori_loop(
      0, k_ref.shape[0] // step, body,
      (jnp.full((rows,), -jnp.inf if running_max else 0.0, jnp.float32),
       jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, dim), jnp.float32)))
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = top + jnp.log2(total)


def _grad_scores(q, k, v, do, lse, delta, scale, cap, approx):
  """P and the raw scores' gradient dS (1 - t^2) of a (queries, keys) block."""
  s, slope = _scores(q, k, scale, cap, approx, shift=lse)
  p = _exp2(s, approx)
  ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
  return p, ds if slope is None else ds * slope


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale,
                cap, step, approx):
  k, v = k_ref[...], v_ref[...]

  def body(i, carry):
    dk, dv = carry
    queries = pl.ds(i * step, step)
    q, do = q_ref[queries, :], do_ref[queries, :]
    p, ds = _grad_scores(q, k, v, do, lse_ref[queries], delta_ref[queries], scale, cap,
                         approx)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // step, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, cap, step,
               approx):
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(j * step, step)
    k = k_ref[keys, :]
    _, ds = _grad_scores(q, k, v_ref[keys, :], do, lse, delta, scale, cap, approx)
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
      functools.partial(kernel, scale=1 / math.sqrt(dim), step=tile.step,
                        approx=not interpret, **options),
      grid=(batch, heads, seq_len // block), in_specs=[specs[x] for x in inputs],
      out_specs=[specs[kind] for kind, _ in outputs],
      out_shape=[shape_dtype for _, shape_dtype in outputs], interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=tile.warps, num_stages=tile.stages))


def forward(q, k, v, cap: float, tile: Tile, interpret: bool):
  """The forward kernel: (out [B, L, H, Dh], the rows' logsumexp in base 2 [B, H, L]
  float32)."""
  batch, seq_len, heads, _ = q.shape
  return _call(_forward_kernel, q.shape, tile, ["block", "all", "all"],
               [("block", jax.ShapeDtypeStruct(q.shape, q.dtype)),
                ("row_block", jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32))],
               interpret, cap=cap)(q, k, v)


def row_delta(out, d_out):
  """rowsum(dO O) [B, H, L] float32, which the backward kernels take."""
  return jnp.einsum("blhd,blhd->bhl", out, d_out, preferred_element_type=jnp.float32)


def dkv(q, k, v, d_out, lse, delta, cap: float, tile: Tile, interpret: bool):
  """The dk and dv kernel: (dk, dv) [B, L, H, Dh]."""
  return _call(_dkv_kernel, q.shape, tile,
               ["all", "block", "block", "all", "row_all", "row_all"],
               [("block", jax.ShapeDtypeStruct(k.shape, k.dtype)),
                ("block", jax.ShapeDtypeStruct(v.shape, v.dtype))],
               interpret, cap=cap)(q, k, v, d_out, lse, delta)


def dq(q, k, v, d_out, lse, delta, cap: float, tile: Tile, interpret: bool):
  """The dq kernel: (dq [B, L, H, Dh],)."""
  return _call(_dq_kernel, q.shape, tile,
               ["block", "all", "all", "block", "row_block", "row_block"],
               [("block", jax.ShapeDtypeStruct(q.shape, q.dtype))],
               interpret, cap=cap)(q, k, v, d_out, lse, delta)


# FLOPs of each kernel per score (per query, key and head) and per unit of Dh: the forward
# pass's q k^T and P v; dkv's q k^T again, dO v^T, P^T dO and dS^T q; dq's q k^T, dO v^T
# and dS k.
FLOPS = {"forward": 4, "dkv": 8, "dq": 6}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, cap: float, tiles: Tiles, interpret: bool):
  return _flash_forward(q, k, v, cap, tiles, interpret)[0]


def _flash_forward(q, k, v, cap, tiles, interpret):
  out, lse = forward(q, k, v, cap, tiles.forward, interpret)
  return out, (q, k, v, out, lse)


def _flash_backward(cap, tiles, interpret, residuals, d_out):
  q, k, v, out, lse = residuals
  d_out = d_out.astype(q.dtype)
  args = (q, k, v, d_out, lse, row_delta(out, d_out))
  d_k, d_v = dkv(*args, cap, tiles.dkv, interpret)
  d_q, = dq(*args, cap, tiles.dq, interpret)
  return d_q, d_k, d_v


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
