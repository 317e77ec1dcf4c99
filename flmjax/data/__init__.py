"""Corpora, tokenizers and the Grain input pipeline."""
