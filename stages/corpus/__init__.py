"""Corpus helpers of tokenize_corpus: sources, tokenizers, stream packing."""
