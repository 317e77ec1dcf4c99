"""Tokenizers: GPT-2 ids, round trips, WordPiece on a written vocab, SentencePiece caching."""

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
  assert gpt2.vocab_size == 50258 and gpt2.pad_id == 50257


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
  assert tok.vocab_size == len(words)


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


def test_vocab_size_the_corpus_cannot_support(tmp_path):
  config = small_config(max_documents=20)
  config.tokenizer.vocab_size = 50000
  corpus = corpora.load_corpus(config.data)
  with pytest.raises(UsageError, match="tokenizer.vocab_size=50000"):
    tokenizers.build_tokenizer(config.tokenizer, tmp_path, corpus)
