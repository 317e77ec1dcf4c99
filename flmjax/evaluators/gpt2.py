"""GPT-2 in JAX, loaded from a local Hugging Face directory (any size; gpt2-large is the
paper's evaluator).

The directory holds config.json, model.safetensors and the tokenizer: vocab.json +
merges.txt, or tokenizer.json. The forward is HF's GPT2LMHeadModel in float32: learned
positions, pre-LayerNorm blocks, causal attention, tanh-approximated GELU ("gelu_new"),
a final LayerNorm and logits tied to the token embedding.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from flmjax.data.tokenizers import GPT2_EOS, byte_level_bpe
from flmjax.errors import UsageError
from flmjax.evaluators import Evaluator


# (n_layer, n_embd) of the released checkpoints, to name an evaluator after its size.
SIZE_NAMES = {(12, 768): "gpt2", (24, 1024): "gpt2-medium", (36, 1280): "gpt2-large",
              (48, 1600): "gpt2-xl"}
# HF name of each block weight -> our name. Conv1D weights are already [in, out].
BLOCK_WEIGHTS = {
    "ln_1.weight": "ln_1_scale", "ln_1.bias": "ln_1_bias",
    "attn.c_attn.weight": "qkv_kernel", "attn.c_attn.bias": "qkv_bias",
    "attn.c_proj.weight": "attn_out_kernel", "attn.c_proj.bias": "attn_out_bias",
    "ln_2.weight": "ln_2_scale", "ln_2.bias": "ln_2_bias",
    "mlp.c_fc.weight": "fc_kernel", "mlp.c_fc.bias": "fc_bias",
    "mlp.c_proj.weight": "mlp_out_kernel", "mlp.c_proj.bias": "mlp_out_bias",
}


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def hidden(params: dict, ids: jax.Array, *, n_head: int, eps: float) -> jax.Array:
  """ids [B, T] -> final hidden states [B, T, D] (after the final LayerNorm)."""
  batch, length = ids.shape
  x = params["wte"][ids] + params["wpe"][:length]
  width = x.shape[-1]

  def block(x, p):
    h = _layer_norm(x, p["ln_1_scale"], p["ln_1_bias"], eps)
    qkv = (h @ p["qkv_kernel"] + p["qkv_bias"]).reshape(batch, length, 3, n_head, -1)
    attn = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                        is_causal=True)
    x = x + attn.reshape(batch, length, width) @ p["attn_out_kernel"] + p["attn_out_bias"]
    h = _layer_norm(x, p["ln_2_scale"], p["ln_2_bias"], eps)
    h = jax.nn.gelu(h @ p["fc_kernel"] + p["fc_bias"], approximate=True)
    return x + h @ p["mlp_out_kernel"] + p["mlp_out_bias"], None

  x, _ = jax.lax.scan(block, x, params["blocks"])
  return _layer_norm(x, params["ln_f_scale"], params["ln_f_bias"], eps)


def _tokenizer(folder: pathlib.Path) -> tokenizers.Tokenizer:
  """GPT-2's byte-level BPE from tokenizer.json, or from vocab.json + merges.txt."""
  if (folder / "tokenizer.json").is_file():
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  vocab, merges = folder / "vocab.json", folder / "merges.txt"
  if not (vocab.is_file() and merges.is_file()):
    raise UsageError(f"{folder} has no GPT-2 tokenizer: it needs tokenizer.json, or "
                     "vocab.json and merges.txt (from the same Hugging Face model).")
  return byte_level_bpe(vocab, merges, (GPT2_EOS,))


def _params(weights: dict[str, np.ndarray], n_layer: int, source: pathlib.Path) -> dict:
  """HF GPT-2 weights -> our pytree, block weights stacked along a leading [n_layer]."""
  weights = {name.removeprefix("transformer."): w for name, w in weights.items()}

  def take(name):
    if name not in weights:
      raise UsageError(f"{source} lacks the GPT-2 weight {name!r}; is it a GPT-2 "
                       "checkpoint?")
    return np.asarray(weights[name], np.float32)

  blocks = {ours: np.stack([take(f"h.{i}.{hf}") for i in range(n_layer)])
            for hf, ours in BLOCK_WEIGHTS.items()}
  return {"wte": take("wte.weight"), "wpe": take("wpe.weight"), "blocks": blocks,
          "ln_f_scale": take("ln_f.weight"), "ln_f_bias": take("ln_f.bias")}


def load(folder: pathlib.Path) -> Evaluator:
  """GPT-2 from a Hugging Face directory (one that `locate` found: config.json and
  model.safetensors are there)."""
  config_file, weights_file = folder / "config.json", folder / "model.safetensors"
  try:
    config = json.loads(config_file.read_text())
  except ValueError as e:  # not JSON, or not UTF-8
    raise UsageError(f"{config_file} is not JSON ({e}).") from None
  needed = ("n_layer", "n_embd", "n_head", "n_positions")
  if not isinstance(config, dict) or config.get("model_type", "gpt2") != "gpt2" or any(
      not isinstance(config.get(k), int) for k in needed):
    raise UsageError(f"{config_file} does not describe a GPT-2 model (model_type gpt2 with "
                     f"{', '.join(needed)}); eval.evaluator=gpt2 takes a Hugging Face GPT-2 "
                     "directory.")
  activation = config.get("activation_function", "gelu_new")
  if activation != "gelu_new":
    raise UsageError(f"{config_file}: activation_function {activation!r} is not "
                     "supported; GPT-2 checkpoints use gelu_new.")
  n_layer, width = config["n_layer"], config["n_embd"]
  try:
    weights = safetensors.numpy.load_file(str(weights_file))
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError, OSError
    raise UsageError(f"{weights_file} cannot be read as safetensors ({str(e)[:200]}); a "
                     "Git LFS pointer (a clone without git-lfs) is one cause.") from None
  params = _params(weights, n_layer, weights_file)
  vocab_size = params["wte"].shape[0]
  tokenizer = _tokenizer(folder)
  eos_id = tokenizer.token_to_id(GPT2_EOS)
  if eos_id is None or tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
    raise UsageError(f"the tokenizer in {folder} does not match the model's {vocab_size} "
                     f"tokens (or lacks {GPT2_EOS}); use the model's own tokenizer files.")
  hidden_fn = functools.partial(hidden, n_head=config["n_head"],
                                eps=config.get("layer_norm_epsilon", 1e-5))
  return Evaluator(name=SIZE_NAMES.get((n_layer, width), folder.name), tokenizer=tokenizer,
                   eos_id=eos_id, max_length=config["n_positions"], params=params,
                   hidden_fn=hidden_fn, unembedding="wte")
