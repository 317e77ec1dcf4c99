"""Prepared shards and the Grain input pipeline.

`prepare` tokenizes a corpus once into ArrayRecord shards of fixed-length examples;
`train_batches` / `eval_batches` read them back with Grain, each process its own disjoint
share, in a seeded order whose position is saved and restored with the iterator state;
`to_global` assembles the per-process batches into one sharded jax.Array.

Wrapping (the paper's training recipe): every document gets EOS appended, documents are
concatenated, cut into chunks of L - 2 tokens and each chunk is framed BOS ... EOS. The
last, partial chunk of each split is dropped (its size is reported as
`dropped_tail_tokens`).
"""

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import socket
import time
from typing import Iterable, Iterator, Sequence

from array_record.python import array_record_module
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from flmjax import outputs
from flmjax.data.corpora import SPLITS, load_corpus, require_training_documents
from flmjax.data.tokenizers import Tokenizer, build_tokenizer
from flmjax.errors import UsageError

FORMAT_VERSION = 1
EXAMPLES_PER_SHARD = 1 << 16
TOKENIZE_BATCH = 1024  # documents per tokenizer call
PROGRESS_SECONDS = 30.0


class Wrapper:
  """Streams documents' token ids into [n, L] examples framed BOS ... EOS.

  Tokens that do not yet fill a chunk wait in `pending` for the next call.
  """

  def __init__(self, seq_len: int, bos_id: int, eos_id: int):
    self.chunk = seq_len - 2
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pending = np.zeros(0, np.int64)

  def add(self, documents: Iterable[Sequence[int]]) -> np.ndarray:
    """Examples completed by these documents' tokens, int64 [n, L]."""
    pieces = [self.pending]
    for ids in documents:
      pieces += [np.asarray(ids, np.int64), np.array([self.eos_id])]
    stream = np.concatenate(pieces)
    n = len(stream) // self.chunk
    self.pending = stream[n * self.chunk:]
    chunks = stream[:n * self.chunk].reshape(n, self.chunk)
    return np.concatenate([np.full((n, 1), self.bos_id), chunks,
                           np.full((n, 1), self.eos_id)], axis=1)


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "int32"


def _write_split(corpus, split: str, tokenizer: Tokenizer, seq_len: int, folder: pathlib.Path,
                 dtype: str) -> dict:
  wrapper = Wrapper(seq_len, tokenizer.bos_id, tokenizer.eos_id)
  stats = {"documents": 0, "tokens": 0, "examples": 0, "files": []}
  writer = None
  start = last_report = time.monotonic()
  for texts in _batched(corpus.documents(split), TOKENIZE_BATCH):
    ids = tokenizer.encode_batch(texts)
    stats["documents"] += len(texts)
    stats["tokens"] += sum(map(len, ids)) + len(ids)  # + one EOS per document
    for example in wrapper.add(ids).astype(dtype):
      if stats["examples"] % EXAMPLES_PER_SHARD == 0:
        if writer is not None:
          writer.close()
        name = f"{split}-{len(stats['files']):05d}.array_record"
        writer = array_record_module.ArrayRecordWriter(str(folder / name), "group_size:1")
        stats["files"].append(name)
      writer.write(example.tobytes())
      stats["examples"] += 1
    now = time.monotonic()
    if now - last_report > PROGRESS_SECONDS:
      last_report = now
      outputs.say(f"prepare {split}: {stats['documents']:,} documents, "
                  f"{stats['tokens']:,} tokens, "
                  f"{stats['documents'] / (now - start):.0f} documents/s", every_process=True)
  if writer is not None:
    writer.close()
  stats["bytes"] = [os.path.getsize(folder / name) for name in stats["files"]]
  stats["dropped_tail_tokens"] = int(wrapper.pending.size)
  return stats


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared corpus: its folder, its metadata and the tokenizer that made it."""
  path: pathlib.Path
  meta: dict
  tokenizer: Tokenizer

  @property
  def seq_len(self) -> int:
    return self.meta["seq_len"]

  def files(self, split: str) -> list[str]:
    return [str(self.path / name) for name in self.meta["splits"][split]["files"]]


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """config.data.dir, else WORKDIR/data; a local directory (shards are written and read
  with local file operations)."""
  path = config.data.dir or os.path.join(workdir, "data")
  if "://" in path:
    raise UsageError(f"the data directory {path} is not local; set --config.data.dir to a "
                     "local directory (on every host of a multi-host run), e.g. "
                     "/tmp/flmjax-data.")
  path = pathlib.Path(path).expanduser()
  existing = next(folder for folder in (path, *path.parents) if folder.exists())
  if not existing.is_dir():
    inside = "" if existing == path else f" is inside {existing}, which"
    raise UsageError(f"the data directory {path}{inside} is a file; set --config.data.dir "
                     "to a directory (new or holding prepared data), or --workdir to one.")
  return path


def run_data_dir(config: ml_collections.ConfigDict, record: dict, run_dir: str) -> str:
  """config.data.dir if set; else where the run in `run_dir` (whose run record is `record`)
  prepared its data, if this host has them there (its record's data.dir, else RUN/data: a
  run folder copied from elsewhere); else "". A later run of the same weights (a student,
  an evaluation) reads them there instead of tokenizing the corpus again."""
  if config.data.dir:
    return config.data.dir
  for folder in (record["config"]["data"]["dir"], os.path.join(str(run_dir), "data")):
    if folder and "://" not in folder and os.path.isdir(os.path.expanduser(folder)):
      return folder
  return ""


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Prepared:
  """Tokenizer and shards for `config`, built once and reused while they still match.

  The folder name is a hash of the corpus, tokenizer and L, so changing any of them builds
  a new folder next to the old one instead of mixing the two. It is written under a
  temporary name and renamed when complete, so an interrupted run leaves nothing that
  looks finished. Processes that share the directory build it once (_exclusive); with
  several processes, every one must have prepared the same data.
  """
  root = data_dir(config, workdir)
  corpus = load_corpus(config.data)
  with _exclusive(root):
    try:
      prepared = _prepare(config, root, corpus)
    except OSError as e:
      if not str(e.filename or "").startswith(str(root)):
        raise
      raise UsageError(f"data.dir {root}: {e.strerror}: {e.filename}; it must be readable, "
                       "and writable until the data for this config are prepared there.") from None
  _check_same_on_every_process(prepared)
  return prepared


@contextlib.contextmanager
def _exclusive(root: pathlib.Path):
  """One process at a time in `root` (its .lock): the first builds the tokenizer and the
  shards, the processes sharing its host wait and reuse them. A directory this process
  cannot write is not locked (it can only read it)."""
  try:
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / ".lock", "w", encoding="utf-8")
  except OSError:
    lock = None
  if lock is None:
    yield
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _check_same_on_every_process(prepared: Prepared) -> None:
  """Refuses prepared data that differ between processes (each host prepares its own:
  a tokenizer trained on each, say, that came out different)."""
  if jax.process_count() == 1:
    return
  text = json.dumps(prepared.meta, sort_keys=True).encode()
  digest = np.frombuffer(hashlib.sha256(text).digest()[:16], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(digest))
  if (every != every[0]).any():
    raise UsageError(f"the processes prepared different data ({prepared.path} here): each "
                     "host prepares its own data.dir, and their corpus or tokenizer came out "
                     "different; prepare once and copy data.dir to every host, or give "
                     "tokenizer.path.")


def _prepare(config: ml_collections.ConfigDict, root: pathlib.Path, corpus) -> Prepared:
  tokenizer = build_tokenizer(config.tokenizer, root, corpus)
  seq_len = config.data.seq_len
  key = hashlib.sha256(json.dumps(
      [FORMAT_VERSION, corpus.fingerprint, tokenizer.fingerprint, seq_len]).encode())
  path = root / f"prepared-{key.hexdigest()[:16]}"
  expected = {"format_version": FORMAT_VERSION, "corpus_fingerprint": corpus.fingerprint,
              "tokenizer_fingerprint": tokenizer.fingerprint, "seq_len": seq_len,
              "vocab_size": tokenizer.vocab_size}
  if path.exists() and not (path / "meta.json").is_file():
    raise UsageError(f"{path} has no meta.json (damaged); move it away to rebuild it.")
  if not path.exists():
    require_training_documents(corpus)
    _remove_stale_partials(root)
    partial = root / (f".{path.name}.partial-{socket.gethostname()}-{jax.process_index()}-"
                      f"{os.getpid()}")
    partial.mkdir(parents=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    splits = {split: _write_split(corpus, split, tokenizer, seq_len, partial, dtype)
              for split in SPLITS}
    meta = dict(expected, corpus=corpus.name, tokenizer=tokenizer.kind, dtype=dtype,
                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                undecodable_bytes=corpus.stats.undecodable_bytes,
                empty_documents=corpus.stats.empty_documents, splits=splits)
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
      partial.rename(path)
    except OSError:  # another process finished the same folder first
      shutil.rmtree(partial)
  damaged = UsageError(f"{path}/meta.json is damaged; move {path} away to rebuild it.")
  try:
    meta = json.loads((path / "meta.json").read_text())
  except ValueError:  # not JSON, or not UTF-8
    raise damaged from None
  if not (isinstance(meta, dict) and isinstance(meta.get("splits"), dict) and all(
      isinstance(meta["splits"].get(split), dict) and isinstance(
          meta["splits"][split].get("files"), list) and "examples" in meta["splits"][split]
      for split in SPLITS)):
    raise damaged
  mismatched = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
  if mismatched:
    raise UsageError(f"{path} was prepared for another setup {mismatched} (found, expected); "
                     "it will not be mixed with this one. Move it away to rebuild it.")
  prepared = Prepared(path, meta, tokenizer)
  missing = [f for split in SPLITS for f in prepared.files(split) if not os.path.isfile(f)]
  if missing:
    raise UsageError(f"{path} lacks {len(missing)} of its shards (first {missing[0]}); move "
                     f"{path} away to rebuild it.")
  for split in SPLITS:  # a copy cut short; folders prepared before sizes were kept: unchecked
    written = meta["splits"][split].get("bytes", [])
    for file, size in zip(prepared.files(split), written):
      if os.path.getsize(file) != size:
        raise UsageError(f"{file} has {os.path.getsize(file):,} bytes, {size:,} when it was "
                         f"written (a copy cut short?); copy it again, or move {path} away "
                         "to rebuild it.")
  return prepared


def _remove_stale_partials(root: pathlib.Path) -> None:
  """Removes the partial folders (of any setup) that a prepare on this host left behind
  when it was killed: the caller holds root's lock, so no process of this host is writing
  one."""
  for partial in root.glob(f".prepared-*.partial-{socket.gethostname()}-*"):
    shutil.rmtree(partial, ignore_errors=True)


def _decode_record(record: bytes, dtype: str) -> np.ndarray:
  return np.frombuffer(record, dtype=dtype).astype(np.int32)


def _to_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": tokens}


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise UsageError(f"batch_size={batch_size} is not divisible by the {process_count} "
                     "processes; make it a multiple.")
  return batch_size // process_count


class _Shards(grain.sources.ArrayRecordDataSource):
  """A split's shards; one that cannot be read (a damaged copy of the right size) is a
  UsageError naming the prepared folder and what to do, where ArrayRecord's error names
  no file."""

  def __init__(self, prepared: Prepared, split: str):
    self.folder = prepared.path
    try:  # opens every shard to count its records
      super().__init__(prepared.files(split))
    except RuntimeError as e:
      raise self._damaged(e) from None

  def _damaged(self, error: RuntimeError) -> UsageError:
    return UsageError(f"{self.folder} holds a shard that cannot be read "
                      f"({str(error).splitlines()[0][:300]}); move {self.folder} away to "
                      "rebuild it.")

  def __getitem__(self, key):
    try:
      return super().__getitem__(key)
    except RuntimeError as e:
      raise self._damaged(e) from None

  def __getitems__(self, keys):
    try:
      return super().__getitems__(keys)
    except RuntimeError as e:
      raise self._damaged(e) from None


def _split(prepared: Prepared, split: str):
  source = _Shards(prepared, split) if prepared.meta["splits"][split]["examples"] else []
  return grain.MapDataset.source(source)


def _decoded(prepared: Prepared, dataset):
  return dataset.map(functools.partial(_decode_record, dtype=prepared.meta["dtype"]))


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count), each JAX's where not given."""
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _process_share(prepared: Prepared, split: str, process_index: int, process_count: int):
  """This process's strided share of a split; all shares have the same length."""
  dataset = _split(prepared, split)
  usable = len(dataset) - len(dataset) % process_count
  return _decoded(prepared, dataset[process_index:usable:process_count])


class _ProcessRows(grain.MapDataset):
  """One process's rows of every global batch: its element j is element
  (j // local) * batch + index * local + j % local of the global order, so process `index`
  holds rows [index * local, (index + 1) * local) of each global batch, the rows its
  devices hold in the batch-sharded global array."""

  def __init__(self, parent: grain.MapDataset, batch: int, local: int, index: int):
    super().__init__(parent)
    self._batch, self._local, self._index = batch, local, index

  def __len__(self) -> int:
    return len(self._parent) // self._batch * self._local

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    batch, row = divmod(j, self._local)
    return self._parent[batch * self._batch + self._index * self._local + row]


# Each element is a whole batch, read by one of 8 threads, up to 16 batches ahead. Grain's
# default reads 500 elements ahead and checks up to 500 futures at every next(): buffered
# batches the loop never needs, and host time on every step.
_READ = grain.ReadOptions(num_threads=8, prefetch_buffer_size=16)


def train_batches(prepared: Prepared, batch_size: int, seed: int, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """Endless batches {"tokens": int32 [batch_size / processes, L]} of the training split.

  Each epoch is a fresh seeded permutation of the whole split, the epochs one after the
  other, cut into global batches of `batch_size` (a batch may hold the end of one epoch
  and the start of the next, where the reference drops each epoch's remainder: the same
  example twice in one batch only where the split is near one batch); each process reads
  only its own rows of each. The global batches are the same for any number of processes,
  so a run may resume on another slice size and see the same data. Iterate with `it =
  iter(ds)`; `it.get_state()` / `it.set_state()` save and restore the position
  ({"next_index": the number of batches read}).
  """
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch_size(batch_size, process_count)
  dataset = _split(prepared, "train")
  if len(dataset) < batch_size:
    examples = prepared.meta["splits"]["train"]["examples"]
    raise UsageError(
        f"the training split has {examples} examples of L={prepared.seq_len} tokens, fewer "
        f"than one batch (batch_size={batch_size}); lower batch_size or data.seq_len, or "
        "use a larger corpus.")
  dataset = _ProcessRows(dataset.shuffle(seed=seed).repeat(), batch_size, local,
                         process_index)
  dataset = _decoded(prepared, dataset).batch(local, drop_remainder=True)
  return dataset.map(_to_batch).to_iter_dataset(_READ)


def eval_batches(prepared: Prepared, split: str, batch_size: int, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """One pass over a split in file order, in full batches: a partial last one is dropped,
  and with several processes the last examples that they do not divide among them, so
  the examples read depend on the process count where the split is not a multiple of the
  batch."""
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch_size(batch_size, process_count)
  dataset = _process_share(prepared, split, process_index, process_count)
  return dataset.batch(local, drop_remainder=True).map(_to_batch).to_iter_dataset(_READ)


def to_global(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """One global jax.Array per field from every process's local rows (batch axis first)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
