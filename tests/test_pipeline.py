"""Wrapping, prepared shards and the Grain pipeline: framing, order, resume, sharding."""

import concurrent.futures
import json
import pathlib
import shutil
import socket

import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest

from conftest import small_config
from flmjax.data import corpora, pipeline
from flmjax.errors import UsageError


def _take(dataset, n):
  it = iter(dataset)
  return [next(it)["tokens"] for _ in range(n)]


def test_wrap_frames_every_chunk_and_loses_no_token():
  rng = np.random.default_rng(0)
  docs = [rng.integers(10, 100, size=rng.integers(0, 20)).tolist() for _ in range(30)]
  seq_len, bos, eos = 8, 1, 2
  wrapper = pipeline.Wrapper(seq_len, bos, eos)
  examples = np.concatenate([wrapper.add(docs[:7]), wrapper.add(docs[7:19]),
                             wrapper.add(docs[19:])])
  assert examples.shape[1] == seq_len
  assert (examples[:, 0] == bos).all() and (examples[:, -1] == eos).all()
  stream = [t for doc in docs for t in doc + [eos]]
  assert examples[:, 1:-1].ravel().tolist() + wrapper.pending.tolist() == stream
  assert len(wrapper.pending) < seq_len - 2


def test_prepared_shards_equal_the_wrapped_corpus(prepared):
  """Reading the shards back gives the corpus wrapped by hand: every document's tokens
  and EOS, concatenated, cut into chunks of L - 2 (the tail dropped), each framed BOS ...
  EOS."""
  corpus = corpora.load_corpus(small_config().data)
  tok = prepared.tokenizer
  width = prepared.seq_len - 2
  for split in corpora.SPLITS:
    stream = [t for ids in tok.encode_batch(list(corpus.documents(split)))
              for t in ids + [tok.eos_id]]
    chunks = np.reshape(stream[:len(stream) // width * width], (-1, width))
    expected = np.concatenate([np.full((len(chunks), 1), tok.bos_id), chunks,
                               np.full((len(chunks), 1), tok.eos_id)], axis=1)
    stats = prepared.meta["splits"][split]
    got = np.concatenate([b["tokens"] for b in
                          pipeline.eval_batches(prepared, split, 1, process_index=0,
                                                process_count=1)])
    np.testing.assert_array_equal(got, expected)
    assert stats["examples"] * (prepared.seq_len - 2) + stats["dropped_tail_tokens"] \
        == stats["tokens"]
  assert prepared.meta["vocab_size"] == 512 and prepared.meta["dtype"] == "uint16"


def test_same_seed_same_batches_other_seed_other_batches(prepared):
  first = _take(pipeline.train_batches(prepared, 8, seed=1), 5)
  again = _take(pipeline.train_batches(prepared, 8, seed=1), 5)
  other = _take(pipeline.train_batches(prepared, 8, seed=2), 5)
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))
  assert first[0].dtype == np.int32 and first[0].shape == (8, prepared.seq_len)


def test_each_epoch_is_a_new_permutation_of_the_data(prepared):
  n = prepared.meta["splits"]["train"]["examples"]
  batches = np.concatenate(_take(pipeline.train_batches(prepared, 1, seed=3), 2 * n))
  rows = [tuple(r) for r in batches]
  assert len(set(rows[:n])) == n and set(rows[:n]) == set(rows[n:])
  assert rows[:n] != rows[n:]


def test_resume_from_saved_iterator_state(prepared):
  dataset = pipeline.train_batches(prepared, 8, seed=1)
  it = iter(dataset)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # survives a round trip through JSON
  expected = [next(it)["tokens"] for _ in range(4)]
  fresh = iter(pipeline.train_batches(prepared, 8, seed=1))
  fresh.set_state(state)
  np.testing.assert_array_equal(np.stack([next(fresh)["tokens"] for _ in range(4)]),
                                np.stack(expected))


def test_two_processes_read_disjoint_shares_covering_the_split(prepared):
  shares = [np.concatenate(list(b["tokens"] for b in pipeline.eval_batches(
      prepared, "train", 2, process_index=i, process_count=2))) for i in range(2)]
  rows = [set(map(tuple, s)) for s in shares]
  everything = set(map(tuple, np.concatenate(
      [b["tokens"] for b in pipeline.eval_batches(prepared, "train", 1, process_index=0,
                                                  process_count=1)])))
  assert not rows[0] & rows[1]
  assert len(everything - rows[0] - rows[1]) <= 3  # at most the odd remainder is unread


def test_global_batches_do_not_depend_on_the_number_of_processes(prepared):
  """Process i holds rows [i * B/P, (i + 1) * B/P) of each global batch, which is the
  same batch a single process reads."""
  steps = prepared.meta["splits"]["train"]["examples"] // 8 + 3  # into the second epoch
  single = _take(pipeline.train_batches(prepared, 8, seed=1, process_index=0,
                                        process_count=1), steps)
  for count in (2, 4):
    shares = [_take(pipeline.train_batches(prepared, 8, seed=1, process_index=i,
                                           process_count=count), steps)
              for i in range(count)]
    assert shares[0][0].shape == (8 // count, prepared.seq_len)
    for step, batch in enumerate(single):
      np.testing.assert_array_equal(np.concatenate([s[step] for s in shares]), batch)


def test_to_global_builds_a_sharded_batch(prepared):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  local = next(iter(pipeline.train_batches(prepared, 8, seed=1)))
  batch = pipeline.to_global(local, sharding)
  assert batch["tokens"].sharding == sharding and batch["tokens"].shape == (8, 32)
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])


def test_batch_not_divisible_by_processes(prepared):
  with pytest.raises(UsageError, match="batch_size=9 is not divisible by the 2 processes"):
    pipeline.train_batches(prepared, 9, seed=1, process_index=0, process_count=2)


def test_corpus_too_small_for_one_batch(prepared):
  with pytest.raises(UsageError, match="fewer than one batch.*batch_size=100000"):
    pipeline.train_batches(prepared, 100000, seed=1)


def test_changed_seq_len_builds_a_new_cache_and_keeps_the_old(tmp_path):
  config = small_config(max_documents=100)
  first = pipeline.prepare(config, str(tmp_path))
  before = {p.name: p.read_bytes() for p in first.path.iterdir()}
  config.data.seq_len = 16
  second = pipeline.prepare(config, str(tmp_path))
  assert second.path != first.path and second.seq_len == 16
  assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
  assert pipeline.prepare(small_config(max_documents=100), str(tmp_path)).path == first.path


def test_cache_from_another_setup_is_refused(tmp_path):
  config = small_config(max_documents=100)
  prepared = pipeline.prepare(config, str(tmp_path))
  meta = dict(prepared.meta, seq_len=64)
  (prepared.path / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(UsageError, match="will not be mixed"):
    pipeline.prepare(config, str(tmp_path))


def test_damaged_or_unfinished_folders(tmp_path):
  """A prepared folder whose meta.json or shards are damaged is refused with what to do; a
  partial folder that a killed prepare of this host left is removed by the next one."""
  config = small_config(max_documents=100)
  prepared = pipeline.prepare(config, str(tmp_path))
  shard = pathlib.Path(prepared.files("train")[0])
  shard.rename(shard.with_suffix(".moved"))
  with pytest.raises(UsageError, match=r"lacks 1 of its shards .* move .* away to rebuild"):
    pipeline.prepare(config, str(tmp_path))
  shard.with_suffix(".moved").rename(shard)
  size = shard.stat().st_size
  with shard.open("r+b") as cut:  # a copy cut short
    cut.truncate(size - 100)
  with pytest.raises(UsageError, match=rf"train-00000.array_record has {size - 100:,} bytes, "
                     rf"{size:,} when it was written \(a copy cut short\?\); copy it again"):
    pipeline.prepare(config, str(tmp_path))
  with shard.open("r+b") as cut:  # a damaged copy of the right size: refused when read
    cut.truncate(size)
    cut.seek(size // 2)
    cut.write(bytes(range(256)) * (size // 1024))
  with pytest.raises(UsageError, match=r"holds a shard that cannot be read \(Corrupted "
                     r"Riegeli.*\); move .* away to rebuild it"):
    next(iter(pipeline.train_batches(pipeline.prepare(config, str(tmp_path)), 8, 0)))
  no_splits = {k: v for k, v in prepared.meta.items() if k != "splits"}
  for damaged in (b'{"format_version": ', b'{"\xff": 1}',  # not JSON; not UTF-8
                  b"[1, 2]", json.dumps(no_splits).encode()):  # JSON, not a whole meta.json
    (prepared.path / "meta.json").write_bytes(damaged)
    with pytest.raises(UsageError, match=r"meta.json is damaged; move .* away to rebuild"):
      pipeline.prepare(config, str(tmp_path))
  (prepared.path / "meta.json").unlink()  # refused at once, not rebuilt beside it
  with pytest.raises(UsageError, match=r"has no meta.json \(damaged\); move it away"):
    pipeline.prepare(config, str(tmp_path))
  shutil.rmtree(prepared.path)
  stale = [prepared.path.parent / f".{name}.partial-{socket.gethostname()}-0-1"
           for name in (prepared.path.name, "prepared-0123456789abcdef")]  # any setup's
  for folder in stale:
    (folder / "sub").mkdir(parents=True)
  again = pipeline.prepare(config, str(tmp_path))
  assert not any(folder.exists() for folder in stale) and again.meta == prepared.meta


def test_prepare_says_what_it_does_from_the_process_that_does_it(tmp_path, capsys,
                                                                   monkeypatch):
  """Progress lines (here after every tokenizer batch) and the tokenizer's training come
  from the process that builds the data, named when there are several (process 1 of 2)."""
  monkeypatch.setattr(pipeline, "PROGRESS_SECONDS", -1.0)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(pipeline, "_check_same_on_every_process", lambda prepared: None)
  pipeline.prepare(small_config(max_documents=100), str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  assert "process 1: training a SentencePiece tokenizer (V = 512)" in lines[0]
  assert any(line.startswith("process 1: prepare train: ") for line in lines)
  assert any(line.startswith("process 1: prepare valid: ") for line in lines)


def test_empty_corpus_is_refused_and_leaves_no_cache(tmp_path):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "empty.txt").write_text("  \n")
  (tmp_path / "corpus" / "tiny.jsonl").write_text('{"text": "one short line"}\n')
  config = small_config(corpus="dir", path=str(tmp_path / "corpus"), valid_fraction=0.0)
  config.tokenizer.kind = "gpt2"
  prepared = pipeline.prepare(config, str(tmp_path / "work"))
  assert prepared.meta["empty_documents"] == 1
  (tmp_path / "corpus" / "tiny.jsonl").unlink()
  with pytest.raises(UsageError, match="no training documents"):
    pipeline.prepare(config, str(tmp_path / "work"))
  leftovers = sorted(p.name for p in (tmp_path / "work" / "data").iterdir())
  assert leftovers == [".lock", prepared.path.name]  # nothing partial left behind
  shutil.rmtree(tmp_path / "work")
  config.tokenizer.kind = "sentencepiece"  # said before a tokenizer is trained on nothing
  with pytest.raises(UsageError, match="no training documents"):
    pipeline.prepare(config, str(tmp_path / "work"))


def test_data_directory_must_be_local_and_a_directory(tmp_path):
  config = small_config()
  config.data.dir = "gs://bucket/data"
  with pytest.raises(UsageError, match="gs://bucket/data is not local; set --config.data.dir"):
    pipeline.prepare(config, str(tmp_path))
  config.data.dir = str(tmp_path / "a_file")
  (tmp_path / "a_file").write_text("kept")
  with pytest.raises(UsageError, match="a_file is a file; set --config.data.dir to a dir"):
    pipeline.prepare(config, str(tmp_path))  # before the tokenizer is trained
  assert (tmp_path / "a_file").read_text() == "kept"
  config.data.dir = ""  # WORKDIR/data, the workdir a file
  with pytest.raises(UsageError, match=r"a_file/data is inside \S+a_file, which is a file"):
    pipeline.prepare(config, str(tmp_path / "a_file"))
  config.data.dir = "/proc/flmjax-data"  # a folder no one can make, even as root
  with pytest.raises(UsageError, match=r"data.dir /proc/flmjax-data: No such file or directory: "
                     "/proc/flmjax-data; it must be readable, and writable until"):
    pipeline.prepare(config, str(tmp_path))


def test_processes_sharing_a_directory_prepare_it_once(tmp_path, monkeypatch):
  """Two threads (as two processes of one host) prepare one directory: one builds it,
  the other waits and reuses it."""
  written, write = [], pipeline._write_split
  monkeypatch.setattr(pipeline, "_write_split",
                      lambda corpus, split, *rest: written.append(split) or write(corpus, split,
                                                                                  *rest))
  config = small_config(max_documents=100)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    paths = list(pool.map(lambda _: pipeline.prepare(config, str(tmp_path)).path, range(2)))
  assert paths[0] == paths[1] and sorted(written) == sorted(pipeline.SPLITS)


def test_processes_that_prepared_different_data_are_refused(tmp_path, monkeypatch):
  config = small_config(max_documents=100)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x]))
  pipeline.prepare(config, str(tmp_path))  # the same in both
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x + 1]))
  with pytest.raises(UsageError, match="the processes prepared different data"):
    pipeline.prepare(config, str(tmp_path))
