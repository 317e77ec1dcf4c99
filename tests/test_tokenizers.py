"""Tokenizers: GPT-2 ids, round trips, WordPiece on a written vocab, SentencePiece caching."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import small_config
from flmjax.data import corpora, tokenizers
from flmjax.errors import UsageError


@pytest.fixture(scope="module")
def gpt2():
  return tokenizers.GPT2Tokenizer(*tokenizers.gpt2_files(""))


def test_gpt2_ids_match_the_published_vocabulary(gpt2):
  assert gpt2.encode_batch(["Hello world"]) == [[15496, 995]]
  assert gpt2.eos_id == gpt2.bos_id == 50256
  assert gpt2.encode_batch(["<|endoftext|>"]) == [[50256]]
  # the baselines' mask is the added pad token, as in the reference (MDLM's GPT-2 setup)
  assert gpt2.vocab_size == 50258 and gpt2.pad_id == gpt2.mask_id == 50257


def test_gpt2_round_trip_keeps_special_tokens(gpt2):
  text = "Flow maps, café ☕ and\nnew lines<|endoftext|>"
  ids = gpt2.encode_batch([text])[0]
  assert gpt2.decode(ids) == text
  assert ids[-1] == 50256


def test_gpt2_missing_files_are_named(tmp_path):
  with pytest.raises(UsageError, match="vocab.bpe"):
    tokenizers.gpt2_files(str(tmp_path))


def _write_vocab(tmp_path, words):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(words) + "\n")
  return path


def test_wordpiece_on_a_small_vocab(tmp_path):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", ",", "."]
  tok = tokenizers.BertTokenizer(_write_vocab(tmp_path, words))
  ids = tok.encode_batch(["Hello, WORLDS. zebra"])[0]
  assert ids == [5, 8, 6, 7, 9, 1]  # hello , world ##s . [UNK]
  assert tok.decode(ids[:5]) == "hello, worlds."
  assert tok.bos_id == tok.eos_id == 2 and tok.pad_id == 0
  assert tok.mask_id == 4  # the [MASK] line: 103 in bert-base-uncased, the reference's mask
  assert tok.vocab_size == len(words)


def test_wordpiece_normalises_and_decodes_as_transformers_bert(tmp_path):
  """Uncased BERT strips accents and splits CJK characters ("Café東京 NAÏVE" -> cafe 東 京
  naive); decoding cleans up tokenization spaces over the whole text, apostrophes
  included. The expected strings are transformers' BertTokenizer's (4.57, the reference's
  decoder) on this vocabulary."""
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "do", "not", "know", ".", ",",
           "'", "s", "t", "it", "don", "the", "##s", "cat", "n", "?", "!", "we", "re", "ve",
           "m", "cafe", "東", "京", "naive"]
  tok = tokenizers.BertTokenizer(_write_vocab(tmp_path, words))
  assert tok.encode_batch(["Café東京 NAÏVE"])[0] == [26, 27, 28, 29]
  for ids, text in [
      ([2, 14, 11, 12, 16, 18, 17, 9, 2], "[CLS] it's the cats. [CLS]"),
      ([2, 15, 11, 13, 6, 7, 10, 5, 20, 2, 0, 0], "[CLS] don't do not, i? [CLS] [PAD] [PAD]"),
      ([2, 22, 11, 23, 11, 24, 5, 11, 25, 21, 3], "[CLS] we're've i'm! [SEP]"),
      ([12, 24, 13, 1, 8, 16, 15, 12, 25, 9, 15, 11, 18, 6, 16, 4, 9, 4, 24, 3],
       "s ve t [UNK] know the don s m. don'cat do the [MASK]. [MASK] ve [SEP]")]:
    assert tok.decode(ids) == text


def test_wordpiece_ids_are_line_numbers(tmp_path):
  """A token holding a character that str.splitlines splits at (U+2028) keeps its line."""
  words = ["[PAD]", "[UNK]", "a\u2028b", "[CLS]", "hello"]
  tok = tokenizers.BertTokenizer(_write_vocab(tmp_path, words))
  assert tok.bos_id == 3 and tok.encode_batch(["hello"])[0] == [4]


def test_wordpiece_vocab_with_a_token_twice_is_refused(tmp_path):
  """Read as Hugging Face reads it, the later line wins: V (the tokens) would be less than
  the largest id plus one."""
  words = ["[PAD]", "[UNK]", "[CLS]", "hello", "world", "hello", "zebra"]
  with pytest.raises(UsageError, match=r"vocab.txt:4: 'hello' is also on line 6"):
    tokenizers.BertTokenizer(_write_vocab(tmp_path, words))


def test_wordpiece_vocab_without_cls_is_refused(tmp_path):
  with pytest.raises(UsageError, match=r"\[CLS\]"):
    tokenizers.BertTokenizer(_write_vocab(tmp_path, ["[PAD]", "[UNK]", "hello"]))


def test_sentencepiece_round_trip_and_byte_fallback(prepared):
  tok = prepared.tokenizer
  assert tok.vocab_size == 512 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  text = "The history of the city began in the 12th century."
  assert tok.decode(tok.encode_batch([text])[0]) == text
  unseen = "漢字 😀 Ωμέγα"  # characters the small training set never had: byte pieces
  assert tok.decode(tok.encode_batch([unseen])[0]) == unseen


def test_sentencepiece_is_trained_once_and_cached(tmp_path, monkeypatch):
  config = small_config(max_documents=200)
  corpus = corpora.load_corpus(config.data)
  first = tokenizers.build_tokenizer(config.tokenizer, tmp_path, corpus)
  monkeypatch.setattr(tokenizers, "train_sentencepiece",
                      lambda *a: pytest.fail("the cached model should be reused"))
  again = tokenizers.build_tokenizer(config.tokenizer, tmp_path, corpus)
  assert again.fingerprint == first.fingerprint


@pytest.mark.parametrize("kind, files, message", [
    ("sentencepiece", {"x.model": b"\xff\x00 not a model"}, "is not a SentencePiece model"),
    ("bert", {"vocab.txt": b"\xff\xfe\x00binary"}, "is not a text vocab.txt"),
    ("gpt2", {"encoder.json": b"not json", "vocab.bpe": b""},
     "does not hold GPT-2's encoder.json and vocab.bpe"),
])
def test_tokenizer_files_of_the_wrong_kind_are_refused(tmp_path, kind, files, message):
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  config = small_config()
  path = tmp_path if kind == "gpt2" else tmp_path / next(iter(files))  # gpt2: the folder
  config.tokenizer.update(kind=kind, path=str(path))
  with pytest.raises(UsageError, match=message) as error:
    tokenizers.build_tokenizer(config.tokenizer, tmp_path, None)
  assert "tokenizer.path" in str(error.value)


def test_vocab_size_the_corpus_cannot_support(tmp_path):
  config = small_config(max_documents=20)
  config.tokenizer.vocab_size = 50000
  corpus = corpora.load_corpus(config.data)
  with pytest.raises(UsageError, match="tokenizer.vocab_size=50000"):
    tokenizers.build_tokenizer(config.tokenizer, tmp_path, corpus)


def test_sentencepiece_trains_on_lines_longer_than_it_takes(tmp_path):
  """SentencePiece leaves out sentences over 2**16 bytes: documents of one 90,000-character
  line each (scraped pages without newlines) are cut at spaces into lines it takes."""
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 8))) for _ in range(500)]
  docs = [" ".join(rng.choice(words, 15_000)) for _ in range(8)]
  lines = list(tokenizers._lines(iter(docs)))
  assert "".join(lines) == "".join(docs) and len(lines) > len(docs)
  assert all(len(line) <= tokenizers.MAX_LINE_CHARS for line in lines)
  assert all(line.startswith(" ") for line in lines if line not in docs and
             not any(doc.startswith(line) for doc in docs))  # cut before a space

  class Corpus:
    name = "long lines"

    def documents(self, split):
      return iter(docs)
  tok = tokenizers.SentencePieceTokenizer(tokenizers.train_sentencepiece(Corpus(), 300),
                                          "long-lines.model")
  text = docs[0][:200].strip()
  assert tok.decode(tok.encode_batch([text])[0]) == text


_TRAIN_SAMPLED = """
import hashlib, os, random
os.cpu_count = lambda: int(os.environ["CPUS"])
from flmjax.data import tokenizers
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
docs = ["\\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(20))
        for _ in range(1000)]
class Corpus:
  name = "words"
  def documents(self, split):
    return iter(docs)
print(hashlib.sha256(tokenizers.train_sentencepiece(Corpus(), 300, max_lines=5000)).hexdigest())
"""


@pytest.mark.slow
def test_sentencepiece_trained_on_a_sample_is_the_same_in_every_process():
  """20,000 lines, 5,000 used: two processes (two hosts, one with 1 core and one with 8)
  must train the same model."""
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  digests = {subprocess.run([sys.executable, "-c", _TRAIN_SAMPLED], env=dict(env, CPUS=cpus),
                            check=True, capture_output=True, text=True).stdout
             for cpus in ("1", "8")}
  assert len(digests) == 1


def test_sample_lines_is_a_uniform_sample_of_distinct_lines():
  lines = [str(i) for i in range(1000)]
  sample = tokenizers.sample_lines(iter(lines), 100)
  assert len(set(sample)) == 100 and set(sample) <= set(lines)
  assert tokenizers.sample_lines(iter(lines), 100) == sample  # fixed seed
  assert tokenizers.sample_lines(iter(lines[:50]), 100) == lines[:50]
  counts = np.zeros(1000)
  for seed in range(200):
    counts[[int(x) for x in tokenizers.sample_lines(iter(lines), 100, seed)]] += 1
  # each line kept with probability 0.1: 20 of 200 draws, binomial sd 4.2
  assert abs(counts[:500].mean() - 20) < 1.5 and abs(counts[500:].mean() - 20) < 1.5
