"""Benchmark Rho-1 scoring and SQL inspection; prints JSON and a Markdown table.

Measured in one run, on the same model (ModelConfig() defaults unless flags say otherwise):
- plain forward passes (inference_mode, no loss) tokens/s: the baseline;
- full `score_reference.score_shard` tokens/s (forward + fp32 loss and entropy + Parquet rows): ratio vs forward;
- training tokens/s (forward + backward + AdamW) of the same model: ratio vs scoring;
- DuckDB query times over a synthetic token_scores table of --rows rows (default 10M) and, with
  --catalog-preset, over the built artifacts of that preset (e.g. the default corpus).

    python benchmarks/score_and_query.py [--tokens 200000] [--rows 10000000] [--catalog-preset default]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from common import best_seconds, emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.configs import ModelConfig, ScoreConfig, TrainConfig  # noqa: E402
from schemas.manifest import Manifest  # noqa: E402
from schemas.tables import SPLITS, TOKEN_SCORES, TOKENS  # noqa: E402
from stages import score_reference  # noqa: E402
from stages.models.gpt import GPT  # noqa: E402
from stages.models.losses import token_loss  # noqa: E402
from stages.runtime.devices import resolve_device  # noqa: E402
from stages.training.optim import build_optimizer  # noqa: E402
from storage.checkpoints import save_model  # noqa: E402
from storage.parquet import write_batches  # noqa: E402
from storage.windows import TokenWindows, stream_file  # noqa: E402


def synthetic_tokens(root: Path, num_tokens: int, vocab_size: int, seq_len: int) -> Manifest:
    """A tokenize_corpus-like artifact with a random train stream (and tiny other splits)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)

    def batches():
        for split in SPLITS:
            n = num_tokens if split == "train" else 4 * seq_len + 1
            stream = rng.integers(0, vocab_size, n).astype(np.int32)
            np.save(root / stream_file(split), stream)
            index = np.arange(n)
            yield pa.RecordBatch.from_arrays([pa.array([split] * n), pa.array(index), pa.array(index // 1000),
                                              pa.array((index % 1000).astype(np.int32)), pa.array(stream)],
                                             schema=TOKENS)

    write_batches(root / "tokens.parquet", batches(), TOKENS)
    return Manifest(stage="tokenize_corpus", key="bench", path=str(root), code_version="1",
                    config={"seq_len": seq_len}, upstream={}, summary={"vocab_size": vocab_size})


def timed(fn, repeats: int = 2) -> float:
    """Best wall time of `repeats` calls (seconds)."""
    return best_seconds(fn, repeats)


def model_throughput(tokens: Manifest, model: GPT, batch_size: int, device: torch.device, root: Path) -> dict:
    """tokens/s of plain forward, of score_shard, and of training steps, on the same windows."""
    windows = TokenWindows.from_manifest(tokens, "train")
    ids = np.arange(len(windows))
    num_tokens = len(ids) * windows.seq_len

    @torch.inference_mode()
    def forward_only():
        for start in range(0, len(ids), batch_size):
            inputs_BT, _ = windows.batch(ids[start:start + batch_size], device)
            model(inputs_BT)

    reference = Manifest(stage="train_reference", key="bench", path=str(root / "reference"), code_version="1",
                         config={}, upstream={})
    save_model(root / "reference", model, {})
    runs = iter(range(100))

    def score():
        score_reference.score_shard(ScoreConfig(batch_size=batch_size, num_shards=1, device=device.type), tokens,
                                    reference, "train", 0, root / f"scores-{next(runs)}", model=model)

    optimizer = build_optimizer(model, TrainConfig(), device)
    train_ids = ids[: max(batch_size, len(ids) // 4)]

    def train_steps():
        model.train()
        for start in range(0, len(train_ids), batch_size):
            inputs_BT, targets_BT = windows.batch(train_ids[start:start + batch_size], device)
            token_loss(model(inputs_BT), targets_BT).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()

    forward_s, score_s = timed(forward_only), timed(score)
    train_s = timed(train_steps, repeats=1)
    forward_tps, score_tps = num_tokens / forward_s, num_tokens / score_s
    train_tps = len(train_ids) * windows.seq_len / train_s
    return {"tokens": num_tokens, "forward_tokens_per_s": forward_tps, "score_tokens_per_s": score_tps,
            "train_tokens_per_s": train_tps, "score_vs_forward": score_tps / forward_tps,
            "score_vs_train": score_tps / train_tps}


def synthetic_scores(path: Path, num_rows: int, vocab_size: int) -> None:
    """num_rows token_scores rows in one Parquet file, sorted by (split, token_index), in 1M-row batches."""
    rng = np.random.default_rng(0)

    def batches():
        for start in range(0, num_rows, 1_000_000):
            index = np.arange(start, min(start + 1_000_000, num_rows))
            yield pa.RecordBatch.from_arrays([
                pa.array(["train"] * len(index)), pa.array(index), pa.array(index // 5000),
                pa.array((index % 5000).astype(np.int32)),
                pa.array(rng.integers(0, vocab_size, len(index), dtype=np.int32)),
                pa.array(rng.gamma(2.0, 2.0, len(index)).astype(np.float32)),
                pa.array(rng.gamma(3.0, 1.5, len(index)).astype(np.float32))], schema=TOKEN_SCORES)

    write_batches(path, batches(), TOKEN_SCORES)


SYNTHETIC_QUERIES = {
    "count by split": "SELECT split, count(*) FROM s GROUP BY 1",
    "mean ref_loss per token id (top 20)":
        "SELECT token_id, avg(ref_loss) m FROM s GROUP BY 1 ORDER BY m DESC LIMIT 20",
    "token_index range (row-group skip)": "SELECT avg(ref_loss) FROM s WHERE token_index BETWEEN 5000000 AND 5010000",
    "per-document mean loss": "SELECT doc_id, avg(ref_loss) FROM s GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
    "loss-and-entropy quantiles":
        "SELECT quantile_cont(ref_loss, [0.1, 0.5, 0.9]), quantile_cont(ref_entropy, 0.5) FROM s",
}


def query_times(con, queries: dict[str, str]) -> dict[str, float]:
    """Best-of-3 wall time (ms) of each query."""
    return {name: 1000 * timed(lambda q=sql: con.execute(q).fetchall(), repeats=3) for name, sql in queries.items()}


def readme_queries() -> dict[str, str]:
    """The ```sql blocks of the SQL cookbook (docs/sql.md), numbered."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "sql.md").read_text()
    return {f"sql.md {i + 1}": q for i, q in enumerate(re.findall(r"```sql\n(.*?)```", text, re.S))}


def main() -> None:
    """Run the measurements and print JSON and a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="synthetic train tokens to score")
    parser.add_argument("--rows", type=int, default=10_000_000, help="synthetic token_scores rows for DuckDB")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--catalog-preset",
                        help="also time the SQL cookbook's queries (docs/sql.md) on this preset's built artifacts")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    import duckdb

    device = resolve_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="lmpipe-bench-"))
    cfg, vocab_size, seq_len = ModelConfig(), 4096, 128
    tokens = synthetic_tokens(root / "tokens", args.tokens, vocab_size, seq_len)
    torch.manual_seed(0)
    model = GPT(cfg, vocab_size, seq_len).to(device).eval()
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "model": cfg.model_dump(),
              "params": model.num_params(non_embedding=False)}
    result["scoring"] = model_throughput(tokens, model, args.batch_size, device, root)
    synthetic_scores(root / "scores.parquet", args.rows, vocab_size)
    con = duckdb.connect()
    con.execute(f"CREATE VIEW s AS SELECT * FROM read_parquet('{root / 'scores.parquet'}')")
    result["duckdb_synthetic_ms"] = {"rows": args.rows, **query_times(con, SYNTHETIC_QUERIES)}
    if args.catalog_preset:
        from flows.status import catalog_for
        from schemas.presets import preset

        result["duckdb_catalog_ms"] = query_times(catalog_for(preset(args.catalog_preset)), readme_queries())
    emit(result, markdown(result), args.json_out)


def markdown(result: dict) -> str:
    """Scoring throughputs and query times as one Markdown table."""
    scoring = result["scoring"]
    lines = ["| measurement | value |", "|---|---|",
             f"| plain forward tokens/s | {scoring['forward_tokens_per_s']:,.0f} |",
             f"| score_reference tokens/s (forward + loss/entropy + Parquet) | {scoring['score_tokens_per_s']:,.0f} "
             f"({scoring['score_vs_forward']:.2f}x forward) |",
             f"| training tokens/s (fwd + bwd + AdamW) | {scoring['train_tokens_per_s']:,.0f} "
             f"(scoring is {scoring['score_vs_train']:.1f}x faster) |"]
    for section in ("duckdb_synthetic_ms", "duckdb_catalog_ms"):
        lines += [f"| {section.removeprefix('duckdb_').removesuffix('_ms')}: {name} | {ms:.1f} ms |"
                  for name, ms in result.get(section, {}).items() if name != "rows"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
