"""Corpora: the embedded default, the user's files, and their documented errors."""

import json
import sys
import types

import pytest

from conftest import small_config
from flmjax.data import corpora
from flmjax.errors import UsageError


def test_embedded_corpus_split_is_stable_and_about_two_percent():
  corpus = corpora.load_corpus(small_config(max_documents=0).data)
  assert corpora.EMBEDDED_PACKAGE not in sys.modules  # located, not imported
  train, valid = list(corpus.documents("train")), list(corpus.documents("valid"))
  assert len(train) + len(valid) == 10033
  assert 0.01 < len(valid) / 10033 < 0.03
  assert not set(train) & set(valid)
  assert sum(map(len, train + valid)) > 4_500_000
  assert list(corpora.load_corpus(small_config(max_documents=0).data)
              .documents("valid")) == valid


def test_text_and_jsonl_directory(tmp_path):
  (tmp_path / "a.txt").write_text("First document.")
  (tmp_path / "sub").mkdir()
  lines = [json.dumps({"text": f"Line document {i}.", "id": i}) for i in range(50)]
  (tmp_path / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n\n")
  (tmp_path / "ignored.csv").write_text("not,a,document")
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path),
                                            valid_fraction=0.2).data)
  train, valid = list(corpus.documents("train")), list(corpus.documents("valid"))
  assert sorted(train + valid) == sorted(["First document."]
                                         + [f"Line document {i}." for i in range(50)])
  assert valid and train


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
  """JSON allows U+2028, U+2029 and U+0085 raw in strings (json.dumps writes them so with
  ensure_ascii=False): lines end at "\n" only, and a bad byte is counted per line."""
  texts = ["one\u2028two", "three\u2029four\x85five", "six"]
  lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts]
  lines[2] = lines[2].replace(b"six", b"s\xffx")
  (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path),
                                            valid_fraction=0.0).data)
  assert list(corpus.documents("train")) == texts[:2] + ["s\ufffdx"]
  assert corpus.stats.undecodable_bytes == 1


def test_a_byte_order_mark_starting_a_file_is_dropped(tmp_path):
  """Editors on Windows save UTF-8 with a BOM (EF BB BF) in front: not part of the text."""
  bom = "\ufeff".encode()
  (tmp_path / "a.txt").write_bytes(bom + "Straße".encode())
  (tmp_path / "b.jsonl").write_bytes(bom + b'{"text": "one"}\n{"text": "two"}\n')
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path),
                                            valid_fraction=0.0).data)
  assert list(corpus.documents("train")) == ["Straße", "one", "two"]
  assert corpus.stats.undecodable_bytes == 0


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"caf\xe9 and na\xefve \xff text")
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path),
                                            valid_fraction=0.0).data)
  assert list(corpus.documents("train")) == ["caf\ufffd and na\ufffdve \ufffd text"]
  assert corpus.stats.undecodable_bytes == 3
  assert list(corpus.documents("valid")) == [] and len(list(corpus.documents("train"))) == 1
  assert corpus.stats.undecodable_bytes == 3  # counted once however often it is read
  (tmp_path / "b.txt").write_text(" \n")
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path),
                                            valid_fraction=0.0).data)
  for _ in range(2):
    assert len(list(corpus.documents("train"))) == 1
  assert corpus.stats.empty_documents == 1


def test_lone_surrogate_escapes_are_replaced_and_counted(tmp_path):
  """JSON may escape half a surrogate pair (\\ud800 alone), which is no character and which
  no tokenizer encodes; a pair is one character."""
  (tmp_path / "d.jsonl").write_text('{"text": "bad \\ud800 and \\udfff"}\n'
                                    '{"text": "pair \\ud83d\\ude00"}\n')
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path),
                                            valid_fraction=0.0).data)
  for _ in range(2):  # counted once
    assert list(corpus.documents("train")) == ["bad \ufffd and \ufffd", "pair \U0001f600"]
  assert corpus.stats.undecodable_bytes == 2


def test_linked_folders_are_read_once(tmp_path):
  (tmp_path / "real").mkdir()
  (tmp_path / "real" / "a.txt").write_text("linked document")
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "b.txt").write_text("own document")
  (tmp_path / "corpus" / "link").symlink_to(tmp_path / "real")
  (tmp_path / "real" / "loop").symlink_to(tmp_path / "corpus")
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path / "corpus"),
                                            valid_fraction=0.0).data)
  assert list(corpus.documents("train")) == ["own document", "linked document"]


def test_a_corpus_all_in_the_validation_split_says_so(tmp_path):
  (tmp_path / "one.txt").write_text("a whole book in one file")
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path),
                                            valid_fraction=1.0).data)
  with pytest.raises(UsageError, match="every document fell in the validation split .*a "
                     ".txt file is one document"):
    corpora.require_training_documents(corpus)


def test_jsonl_line_without_the_text_field(tmp_path):
  (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path)).data)
  with pytest.raises(UsageError, match=r"d.jsonl:2: no field 'text'.*\['body'\]"):
    list(corpus.documents("train"))


def test_jsonl_line_that_is_not_json(tmp_path):
  (tmp_path / "d.jsonl").write_text('{"text": "ok"}\nnot json\n')
  corpus = corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path)).data)
  with pytest.raises(UsageError, match="d.jsonl:2: not valid JSON"):
    list(corpus.documents("train"))


@pytest.mark.parametrize("path, message", [
    ("", "needs data.path"),
    ("/nonexistent/corpus", "does not exist"),
])
def test_bad_corpus_path(path, message):
  with pytest.raises(UsageError, match=message):
    corpora.load_corpus(small_config(corpus="dir", path=path).data)


def test_directory_without_text_files(tmp_path):
  (tmp_path / "notes.md").write_text("# not a corpus file")
  with pytest.raises(UsageError, match="no .txt or .jsonl files"):
    corpora.load_corpus(small_config(corpus="dir", path=str(tmp_path)).data)


def test_hugging_face_corpora_load_as_the_reference_and_say_why_they_cannot(monkeypatch):
  """With a stand-in for `datasets`: LM1B's test split is its validation split, detokenized;
  before datasets 4 loading scripts are allowed, as the reference allows them; a failure
  is one line with what to do."""
  calls = []

  def load_dataset(name, split, **options):
    calls.append((name, split, options))
    return [{"text": "Hello , world ."}]
  fake = types.SimpleNamespace(__version__="3.6.0", load_dataset=load_dataset)
  monkeypatch.setitem(sys.modules, "datasets", fake)
  corpus = corpora.load_corpus(small_config(corpus="lm1b").data)
  assert list(corpus.documents("valid")) == ["Hello, world."]
  fake.__version__ = "4.0.0"
  assert list(corpus.documents("train")) == ["Hello, world."]
  assert calls == [("lm1b", "test", {"trust_remote_code": True}), ("lm1b", "train", {})]
  # OpenWebText holds out its last 100k documents (the reference's split), not detokenized.
  owt = corpora.load_corpus(small_config(corpus="openwebtext").data)
  assert list(owt.documents("train")) == list(owt.documents("valid")) == ["Hello , world ."]
  assert calls[2:] == [("openwebtext", "train[:-100000]", {}),
                       ("openwebtext", "train[-100000:]", {})]

  def no_scripts(*args, **kwargs):
    raise RuntimeError("Dataset scripts are no longer supported, but found lm1b.py")
  fake.load_dataset = no_scripts
  with pytest.raises(UsageError, match=r"datasets 4.0.0 could not load 'lm1b' \(RuntimeError: "
                                       r"Dataset scripts.*data.corpus=dir"):
    list(corpus.documents("train"))


def test_lm1b_detokenizer():
  assert (corpora.lm1b_detokenize('He said , " it \'s fine . " ( really ) ?')
          == 'He said, "it\'s fine." (really)?')
  assert corpora.lm1b_detokenize("Prices rose 5 % to $ 3 .") == "Prices rose 5 % to $3."


def test_valid_split_is_a_stable_hash():
  keys = [f"doc{i}" for i in range(4000)]
  half = [corpora.in_valid_split(k, 0.5) for k in keys]
  assert 0.45 < sum(half) / len(keys) < 0.55
  assert half == [corpora.in_valid_split(k, 0.5) for k in keys]
  assert not any(corpora.in_valid_split(k, 0.0) for k in keys)
