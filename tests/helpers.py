"""The one set of test builders: fake tokenize_corpus/model artifacts and tiny model/train configs."""

from pathlib import Path

import numpy as np
import torch

from schemas.configs import ModelConfig, TrainConfig
from schemas.manifest import Manifest
from schemas.tables import SPLITS, TOKENS
from stages.models.gpt import GPT
from storage.checkpoints import save_model
from storage.parquet import write_table
from storage.windows import stream_file

TINY_MODEL = ModelConfig(num_layers=2, num_heads=2, d_model=32)
"""2 blocks of width 32: trains a step in a few milliseconds on CPU."""


def synthetic_stream(num_tokens: int, vocab_size: int, seed: int = 0, noise: float = 0.2) -> np.ndarray:
    """A learnable int32 stream: mostly x[t+1] = (3*x[t] + 1) % V, a `noise` fraction random tokens."""
    rng = np.random.default_rng(seed)
    stream = np.empty(num_tokens, dtype=np.int32)
    stream[0] = 0
    random_tokens = rng.integers(0, vocab_size, num_tokens)
    is_noise = rng.random(num_tokens) < noise
    for t in range(1, num_tokens):
        stream[t] = random_tokens[t] if is_noise[t] else (3 * stream[t - 1] + 1) % vocab_size
    return stream


def make_token_artifact(directory: Path, *, seq_len: int = 16, vocab_size: int = 64,
                        num_tokens: dict[str, int] | None = None, seed: int = 0) -> Manifest:
    """Write stream-<split>.npy for every split into `directory` and return a tokenize_corpus Manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 40 * seq_len + 1, "val": 12 * seq_len + 1, "ref_train": 24 * seq_len + 1,
             "ref_val": 8 * seq_len + 1} | (num_tokens or {})
    for i, split in enumerate(SPLITS):
        np.save(directory / stream_file(split), synthetic_stream(sizes[split], vocab_size, seed=seed + i))
    return Manifest(stage="tokenize_corpus", key="k", path=str(directory), code_version="1",
                    config={"seq_len": seq_len, "vocab_size": vocab_size}, upstream={},
                    summary={"vocab_size": vocab_size,
                             "num_windows": {split: (sizes[split] - 1) // seq_len for split in SPLITS}})


def tiny_train_config(**overrides) -> TrainConfig:
    """A CPU TrainConfig of a few steps: 2 micro-batches of 4 windows of 16 tokens per step."""
    values = dict(max_tokens=8 * 128, batch_size_tokens=128, micro_batch_size=4, lr=3e-3, warmup_steps=2,
                  eval_every_steps=4, eval_max_windows=8, log_every_steps=2, checkpoint_every_steps=3,
                  device="cpu", seed=0)
    return TrainConfig(**(values | overrides))


def tiny_run(tokens: Manifest, work_dir: Path, cfg: TrainConfig | None = None, *, objective=None,
             on_step=None, probe_windows: int = 3) -> dict:
    """Train a TINY_MODEL next-token objective on `train`, evaluating on `val` and `ref_val`, with a probe."""
    from schemas.configs import TargetVariant
    from stages.objectives.factory import build_objective
    from stages.training.loop import ProbeSet, TrainRun, train
    from storage.windows import TokenWindows

    objective = objective or build_objective(TINY_MODEL, TargetVariant(name="ntp"))
    val = {split: TokenWindows.from_manifest(tokens, split) for split in ("val", "ref_val")}
    return train(TrainRun(objective, TokenWindows.from_manifest(tokens, "train"), val, cfg or tiny_train_config(),
                          work_dir, vocab_size=int(tokens.summary["vocab_size"]), label="tiny",
                          probe=ProbeSet("val", np.arange(probe_windows)), meta={"test": True}), on_step)


SEQ_LEN = 16
VOCAB = 64
TINY = TINY_MODEL
STREAM_TOKENS = {"train": SEQ_LEN * 23 + 7, "val": SEQ_LEN * 9 + 1, "ref_train": SEQ_LEN * 11 + 15,
                 "ref_val": SEQ_LEN * 5 + 3}


def manifest(stage: str, path: Path, config: dict | None = None, summary: dict | None = None) -> Manifest:
    """A finished-looking manifest for an artifact directory built by a test."""
    return Manifest(stage=stage, key=stage[:8], path=str(path), code_version="test", config=config or {},
                    upstream={}, summary=summary or {})


def make_tokens(root: Path, vocab_size: int = VOCAB, lengths: dict | None = None, seed: int = 0) -> Manifest:
    """A fake tokenize_corpus artifact: random streams and a tokens.parquet with made-up doc_id/position."""
    out = root / "tokens"
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    columns = {name: [] for name in TOKENS.names}
    for i, split in enumerate(SPLITS):
        stream = rng.integers(0, vocab_size, (lengths or STREAM_TOKENS)[split]).astype(np.int32)
        np.save(out / stream_file(split), stream)
        index = np.arange(len(stream))
        columns["split"] += [split] * len(stream)
        columns["token_index"].append(index)
        columns["doc_id"].append(1000 * i + index // 37)
        columns["position"].append((index % 37).astype(np.int32))
        columns["token_id"].append(stream)
    table = {k: v if k == "split" else np.concatenate(v) for k, v in columns.items()}
    write_table(out / "tokens.parquet", table, TOKENS)
    num_windows = {split: ((lengths or STREAM_TOKENS)[split] - 1) // SEQ_LEN for split in SPLITS}
    summary = {"vocab_size": vocab_size, "num_windows": num_windows}
    return manifest("tokenize_corpus", out, {"seq_len": SEQ_LEN}, summary)


def make_model(root: Path, name: str, vocab_size: int = VOCAB, seed: int = 0, config: dict | None = None) -> Manifest:
    """A fake model artifact: a tiny random GPT saved with storage.checkpoints.save_model."""
    torch.manual_seed(seed)
    model = GPT(TINY, vocab_size, SEQ_LEN)
    save_model(root / name, model, {})
    return manifest("train_reference", root / name, config)


def save_tiny_tokenizer(path: Path, vocab_size: int = 280):
    """A tiny byte-level BPE with <|endoftext|> from the project's trainer, saved as tokenizer.json at `path`."""
    from stages.corpus.tokenizers import train_bpe

    tokenizer = train_bpe(["the union is strong and the people are free"] * 20, vocab_size)
    tokenizer.save(str(path))
    return tokenizer
