"""Conditional generation: prompts in, texts out (`Generator`, `--mode=generate`).

A prompt is a template: text, with placeholders `{{N}}` for N tokens to write and at most
one `{{}}` for a gap as long as the sequence allows. It is laid out over the model's L
positions as the training examples are (BOS at position 0, EOS last): the text before
`{{}}` from position 1 on, the text after it at the end, just before the final EOS (a
suffix). Without `{{}}` the positions after the template are written (a continuation).
Text is given (flmjax/conditioning.py), placeholders are written. A prompt may also be a
list of token ids: a prefix after BOS. So "The cat sat" continues a prompt, "{{}} and
they lived happily ever after." writes what leads to an ending, "The {{3}} sat on the
{{}} every day." fills two gaps.

Each prompt's text segments are encoded separately, with the model's own tokenizer,
without their trailing spaces: a written token brings its own ("The history of {{}}" is
"The history of" and a word that starts with a space, as GPT-2's BPE writes it). A segment
right after a placeholder that does not start with a space continues the word written
there ("un{{2}}able", "The history of {{}}."): SentencePiece encodes it without the space
that it gives a text's first word (Tokenizer.encode_glued).
Sampling is the model's: Euler steps for an FLM, the flow map for an FMLM student (one
step by default), each evaluation reading the given positions as their tokens, with
classifier-free guidance `sample.guidance` for a model trained with `train.condition`
(flmjax/sampling.py). A model trained with
`train.condition` has learned to read given positions; any other FLM or FMLM still
follows them through clamping alone, less well at few steps (docs/conditioning.md).

A Generator loads the weights once and compiles its sampler once per (batch size, L,
steps): any number of prompts runs in batches of `batch_size`, the last one padded.
The result of each prompt is {prompt, text, steps, seconds}: `text` is the decoded
sequence, given and written tokens together, without BOS and EOS, a continuation cut at
its first EOS; `seconds` is its batch's sampling time over the batch size (the sampler is
compiled at the first call, once the prompts are laid out, and not counted).
"""

import dataclasses
import json
import re
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flmjax import conditioning, evaluate, outputs, registry
from flmjax.errors import UsageError
from flmjax.sampling import Condition

PLACEHOLDER = re.compile(r"\{\{(\d*)\}\}")


@dataclasses.dataclass(frozen=True)
class Layout:
  """A prompt over L positions: given [L] bool, tokens [L] (the given ones' values) and,
  for a continuation, the first written position after the template (else None)."""
  given: np.ndarray
  tokens: np.ndarray
  continuation: int | None


def _parts(prompt: str) -> list:
  """Text segments and gaps (an int, or None for `{{}}`) of a template."""
  parts, start = [], 0
  for match in PLACEHOLDER.finditer(prompt):
    digits = match.group(1)
    if len(digits) > 9:  # more positions than any sequence has (and than int() reads)
      raise UsageError(f"prompt {prompt[:80]!r}: {{{{N}}}} with a {len(digits)}-digit N "
                       "asks for more positions than the sequence has; shorten it.")
    parts += [prompt[start:match.start()], int(digits) if digits else None]
    start = match.end()
  parts.append(prompt[start:])
  # a written token brings its own leading space (GPT-2's BPE would make a lone ' ' of it)
  parts = [p.rstrip(" ") if isinstance(p, str) else p for p in parts]
  stray = [p for p in parts if isinstance(p, str) and ("{{" in p or "}}" in p)]
  if stray or parts.count(None) > 1 or any(p == 0 for p in parts if isinstance(p, int)):
    raise UsageError(f"prompt {prompt!r}: a placeholder is {{{{N}}}} (N > 0 tokens to "
                     "write) or {{}} (the rest of the sequence, at most once); other uses "
                     "of {{ and }} are not a template.")
  return [p for p in parts if p != ""]


def layout(prompt: str | Sequence[int], tokenizer, seq_len: int) -> Layout:
  """The Layout of one prompt (see the module docstring); a prompt that does not fit L
  positions with at least one to write is a UsageError naming it."""
  if isinstance(prompt, str):
    # texts and gaps alternate: a text after the first follows a gap, and continues the
    # word written there unless it starts with a space
    parts = [p if not isinstance(p, str) else (
        tokenizer.encode_glued if i and not p[0].isspace() else tokenizer.encode_batch)([p])[0]
             for i, p in enumerate(_parts(prompt))]
  else:
    parts = [[int(i) for i in prompt]]
    wrong = [i for i in parts[0] if not 0 <= i < tokenizer.vocab_size]
    if wrong:
      raise UsageError(f"prompt {str(prompt)[:80]!r}: token id {wrong[0]} is not an id of "
                       f"the model's tokenizer (0 to {tokenizer.vocab_size - 1}); give ids "
                       "from its encoding, or the text.")
  split = parts.index(None) if None in parts else len(parts)
  head, tail = [[tokenizer.bos_id]] + parts[:split], parts[split + 1:] + [[tokenizer.eos_id]]

  def size(items):
    return sum(len(p) if isinstance(p, list) else p for p in items)
  gap = split < len(parts)  # a {{}}: one position at least, before the tail
  taken = size(head) + (size(tail) + 1 if gap else 0)
  writes = gap or any(isinstance(p, int) for p in head) or taken < seq_len
  if taken > seq_len or not writes:
    raise UsageError(f"prompt {str(prompt)[:80]!r} takes {taken} of the model's L = "
                     f"{seq_len} positions and leaves none to write; shorten it.")
  given, tokens = np.zeros(seq_len, bool), np.zeros(seq_len, np.int32)

  def place(items, position):
    for item in items:
      if isinstance(item, list):
        given[position:position + len(item)] = True
        tokens[position:position + len(item)] = item
        position += len(item)
      else:
        position += item
    return position

  end = place(head, 0)
  if gap:
    place(tail, seq_len - size(tail))
    return Layout(given, tokens, None)
  return Layout(given, tokens, end)


class Generator:
  """The weights of a workdir or export, loaded once, writing texts for prompts."""

  def __init__(self, checkpoint: str, config: ml_collections.ConfigDict, *,
               steps: int | None = None, batch_size: int = 16):
    """`config` supplies the mesh and the sample options (sample.steps when `steps` is
    None, sample.gamma for a student's churn)."""
    self.record, self.graphdef, self.params, self.tokenizer = evaluate.load(config,
                                                                            checkpoint)
    if self.record["kind"] not in ("flm", "fmlm"):
      raise UsageError(f"{checkpoint} holds a {self.record['kind']} model; conditional "
                       "generation takes an FLM or FMLM (family=flm, or its distilled "
                       "student).")
    registry.check_sample_options(self.record["kind"], config.sample, checkpoint)
    trained = self.record["config"].get("train", {})
    if config.sample.guidance and not (conditioning.parse_kinds(trained.get("condition", ""))
                                       and trained.get("condition_dropout")):
      raise UsageError(f"sample.guidance={config.sample.guidance} combines the conditional "
                       "and unconditional denoisers of a model trained with "
                       "train.condition and train.condition_dropout > 0 (which teaches "
                       f"the unconditional one); {checkpoint} was trained without them: set "
                       "sample.guidance=0 (conditional sampling alone).")
    self.steps, self.batch_size = steps or config.sample.steps, batch_size
    self.seq_len = self.record["config"]["data"]["seq_len"]
    _, self._sample = evaluate.sampler_for(config, self.record, self.tokenizer, self.steps,
                                           batch_size)
    self._compiled = False

  def generate(self, prompts: Sequence[str | Sequence[int]], seed: int = 0) -> list[dict]:
    """{prompt, text, steps, seconds} for each prompt (see the module docstring)."""
    layouts = [layout(p, self.tokenizer, self.seq_len) for p in prompts]
    if not self._compiled:  # once, and only for prompts that fit
      blank = np.zeros((self.batch_size, self.seq_len), bool)
      jax.block_until_ready(self._sample(self.graphdef, self.params, jax.random.key(0),
                                         Condition(jnp.asarray(blank),
                                                   jnp.zeros(blank.shape, jnp.int32))))
      self._compiled = True
    results = []
    for start in range(0, len(layouts), self.batch_size):
      batch = layouts[start:start + self.batch_size]
      padded = batch + [batch[-1]] * (self.batch_size - len(batch))
      condition = Condition(jnp.asarray(np.stack([x.given for x in padded])),
                            jnp.asarray(np.stack([x.tokens for x in padded])))
      key = jax.random.fold_in(jax.random.key(seed), start)
      began = time.perf_counter()
      tokens, _ = self._sample(self.graphdef, self.params, key, condition)
      tokens = np.asarray(jax.device_get(tokens))
      seconds = (time.perf_counter() - began) / self.batch_size
      for i, item in enumerate(batch):
        results.append({"prompt": prompts[start + i],
                        "text": text_of(tokens[i], item, self.tokenizer),
                        "steps": self.steps, "seconds": seconds})
    return results



def text_of(ids: np.ndarray, item: Layout, tokenizer) -> str:
  """The decoded sequence [L] of a prompt laid out as `item`, without BOS, EOS and pad;
  a continuation is cut at the first EOS written after the template. An EOS written
  elsewhere (in a {{N}} or a {{}}) is dropped, not cut at: the given text after it
  stays."""
  ids = ids[1:]
  if item.continuation is not None:
    written = ids[item.continuation - 1:]
    ends = np.flatnonzero(written == tokenizer.eos_id)
    ids = ids[:item.continuation - 1 + (ends[0] if len(ends) else len(written))]
  special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
  return tokenizer.decode([int(i) for i in ids if i not in special])


def read_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """generate.prompt (one), or the lines of generate.prompts_file ("-": standard input;
  UTF-8, a BOM skipped; lines end at \n or \r\n only), empty lines skipped; each
  template's placeholders checked."""
  prompt = config.generate.prompt if config.generate.prompt.strip() else ""  # blank: none
  source = config.generate.prompts_file
  if bool(prompt) == bool(source):
    raise UsageError("--mode=generate needs one of --config.generate.prompt=TEXT or "
                     "--config.generate.prompts_file=FILE (one prompt per line; - reads "
                     "standard input)" + (", not both." if prompt else "."))
  if prompt:
    prompts = [prompt]
  else:
    try:
      if source == "-":
        raw = sys.stdin.buffer.read()
      else:
        with open(source, "rb") as file:
          raw = file.read()
    except OSError as error:
      raise UsageError(f"generate.prompts_file={source}: {error.strerror}.") from error
    try:
      text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
      raise UsageError(f"generate.prompts_file={source}: byte {error.start} is not UTF-8; "
                       "save the prompts as UTF-8.") from None
    prompts = [line.removesuffix("\r") for line in text.split("\n")]
    prompts = [line for line in prompts if line.strip()]
    if not prompts:
      raise UsageError(f"generate.prompts_file={source} holds no prompt.")
  for text in prompts:
    _parts(text)  # a malformed placeholder, before the weights are loaded
  return prompts


def generate_mode(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """`--mode=generate`: the texts of the prompts, as JSON lines on standard output and in
  WORKDIR/generations.jsonl (replacing the last run's)."""
  prompts = read_prompts(config)
  path = outputs.create_workdir(workdir)
  generator = Generator(config.checkpoint, config, batch_size=config.generate.batch_size)
  results = generator.generate(prompts, seed=config.seed)
  lines = "".join(json.dumps(r) + "\n" for r in results)
  if jax.process_index() == 0:
    outputs.write_text(path / "generations.jsonl", lines)
    sys.stdout.write(lines)
  return results
