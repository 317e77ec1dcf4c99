"""Conditioning on given positions: the masks drawn for training, and clamping.

A condition is a boolean mask `given` [B, L] (True: the position's token is given) beside
the tokens [B, L] that hold the given values. Whatever the time, a given position enters
the network clean, its latent the token's embedding row E[token] (x = the one-hot); the
loss leaves it out; the samplers give it to every evaluation as its token (the paper's
clamping) and return it unchanged. A model with `model.condition_embedding=True` also
adds a learned vector, zero at initialisation, to its input at the given positions (the
indicator of conditioned positions, projected and added to the input).

Clamping alone works for any FLM or FMLM, including one trained without conditioning
(training-free conditioning); a model trained with `train.condition` has seen given
positions at every time.

`train.condition` lists the kinds of masks drawn for training, one kind per example,
uniformly among those listed, with a random length: n ~ U{1, ..., L - 1} given tokens

- "prefix": the first n positions (continuing a prompt; BOS is position 0);
- "suffix": the last n positions (writing what leads to an ending);
- "infill": all but one span of L - n positions at a uniform start (filling a gap).

With probability `train.condition_dropout` an example has no given position, so that the
model also samples unconditionally.
"""

import jax
import jax.numpy as jnp

KINDS = ("prefix", "suffix", "infill")


def parse_kinds(kinds: str) -> tuple[str, ...]:
  """train.condition ("prefix,suffix") -> ("prefix", "suffix"); "" -> ()."""
  return tuple(k.strip() for k in kinds.split(",") if k.strip())


def draw(rng: jax.Array, shape: tuple[int, int], kinds: tuple[str, ...],
         dropout: float) -> jax.Array:
  """Masks `given` [B, L] bool: per example one of `kinds` (uniformly), n ~ U{1, ..., L - 1}
  given positions, and with probability `dropout` none."""
  batch, length = shape
  rng_kind, rng_count, rng_start, rng_drop = jax.random.split(rng, 4)
  count = jax.random.randint(rng_count, (batch, 1), 1, length)  # given positions
  gap = length - count  # the positions to write in an infill
  start = jnp.floor(jax.random.uniform(rng_start, (batch, 1)) * (count + 1)).astype(jnp.int32)
  position = jnp.arange(length)[None]
  masks = {"prefix": position < count, "suffix": position >= gap,
           "infill": (position < start) | (position >= start + gap)}
  kind = jax.random.randint(rng_kind, (batch, 1), 0, len(kinds))
  given = jnp.zeros(shape, bool)
  for i, name in enumerate(kinds):
    given = jnp.where(kind == i, masks[name], given)
  keep = jax.random.uniform(rng_drop, (batch, 1)) >= dropout
  return given & keep


def clamp(state: jax.Array, given: jax.Array | None, clean: jax.Array) -> jax.Array:
  """`state` [B, L, ...] with the given positions replaced by `clean` (the same shape)."""
  return state if given is None else jnp.where(given[..., None], clean, state)
