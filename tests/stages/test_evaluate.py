"""Tests of the evaluate stage on fake tokens, reference and target artifacts (tiny GPTs, CPU)."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.configs import EvaluateConfig
from schemas.tables import METRICS, PROBE_LOSSES, TOKEN_DYNAMICS
from stages import evaluate
from stages.evaluate import unigram_entropy
from stages.evaluation.curves import first_reach, tokens_to_reach
from stages.models.losses import token_loss
from stages.models.saved import load_model
from storage.parquet import write_table
from storage.windows import TokenWindows, spread_window_ids
from tests.helpers import SEQ_LEN, make_model, make_tokens, save_tiny_tokenizer

VAL_CURVES = {  # tokens_seen 0, 100, 200, 300 -> val/val/loss
    "ntp": [5.0, 4.0, 3.0, 2.0],   # baseline: final 2.0, reached at 300 tokens
    "slm": [5.0, 3.0, 2.5, 1.5],   # reaches 2.0 halfway between 200 (2.5) and 300 (1.5): 250 tokens
    "mtp": [5.0, 4.5, 4.0, 3.5],   # never reaches 2.0
}


def curve_table(values: list[float], name: str = "val/val/loss") -> pa.Table:
    return pa.Table.from_pylist([{"step": i, "tokens_seen": 100 * i, "name": name, "value": v}
                                 for i, v in enumerate(values)], METRICS)


def test_first_reach_interpolates_linearly():
    tokens_seen, values = np.array([0, 100, 200, 300]), np.array([5.0, 3.0, 2.5, 1.5])
    assert first_reach(tokens_seen, values, 2.0) == 250.0
    assert first_reach(tokens_seen, values, 2.5) == 200.0  # hit exactly at an evaluation
    assert first_reach(tokens_seen, values, 4.0) == 50.0
    assert first_reach(tokens_seen, values, 6.0) == 0.0
    assert first_reach(tokens_seen, values, 1.0) is None


def test_tokens_to_reach_baseline_final_loss():
    metrics = {name: curve_table(values) for name, values in VAL_CURVES.items()}
    metrics["ntp"] = pa.concat_tables([metrics["ntp"], curve_table([9.0, 9.0], "train/loss")])
    reach = tokens_to_reach(metrics, ["ntp"], "val")
    assert reach["ntp"] == (300.0, 1.0)
    assert reach["slm"] == (250.0, 250.0 / 300.0)
    assert reach["mtp"] == (None, None)
    with pytest.raises(ValueError, match="baseline"):
        tokens_to_reach(metrics, ["nope"], "val")


def test_tokens_to_reach_the_mean_of_the_baseline_seed_runs():
    metrics = {"ntp": curve_table([5.0, 4.0, 3.0, 2.0]), "ntp.seed1": curve_table([5.0, 4.0, 3.0, 3.0]),
               "slm": curve_table([5.0, 3.0, 2.5, 1.5])}
    reach = tokens_to_reach(metrics, ["ntp", "ntp.seed1"], "val")  # level = mean(2.0, 3.0) = 2.5, budget 300
    assert reach["ntp"] == (250.0, 250.0 / 300.0)
    assert reach["ntp.seed1"] == (None, None)
    assert reach["slm"] == (200.0, 200.0 / 300.0)


def test_unigram_entropy_in_nats():
    assert unigram_entropy(np.array([0, 0, 1, 1], np.int32), 8) == pytest.approx(math.log(2))
    assert unigram_entropy(np.arange(6, dtype=np.int32), 6, chunk=4) == pytest.approx(math.log(6))


def make_tokenizer(path: Path) -> int:
    """The tiny test tokenizer saved as tokenizer.json; its vocabulary size."""
    return save_tiny_tokenizer(path).get_vocab_size()


def run_evaluate(cfg, tokens, reference, targets, out):
    inputs = {"tokens": tokens, "reference": reference}
    inputs |= {f"target.{t.config['variant']['name']}": t for t in targets}
    return evaluate.run(cfg, inputs, out)


def make_target(root: Path, name: str, vocab_size: int, seed: int, probes: bool, nested: bool):
    """A fake train_target artifact: tiny GPT, metrics.parquet and (optionally) probe_losses.parquet."""
    variant = {"name": name}
    config = {"target": {"dynamics": {"delta_threshold": 0.2}}, "variant": variant} if nested else \
        {"dynamics": {"delta_threshold": 0.2}, "variant": variant}
    target = make_model(root, f"target_{name}", vocab_size, seed, config)
    values = VAL_CURVES[name]
    metrics = pa.concat_tables([curve_table(values), curve_table([v + 1 for v in values], "val/ref_val/loss"),
                                curve_table([v + 0.5 for v in values], "train/loss")])
    write_table(Path(target.path) / "metrics.parquet", metrics, METRICS)
    if probes:
        rng = np.random.default_rng(seed)
        rows = [{"step": s, "tokens_seen": 100 * s, "split": "val", "token_index": i, "loss": float(v)}
                for i in range(1, 33) for s, v in enumerate(rng.normal(3, 1, 3))]
        write_table(Path(target.path) / "probe_losses.parquet", pa.Table.from_pylist(rows, PROBE_LOSSES), PROBE_LOSSES)
    return target


@pytest.fixture
def setup(tmp_path: Path):
    tokens = make_tokens(tmp_path, vocab_size=280)
    vocab_size = make_tokenizer(Path(tokens.path) / "tokenizer.json")
    assert vocab_size <= 280
    reference = make_model(tmp_path, "reference", 280, seed=0)
    targets = [make_target(tmp_path, "ntp", 280, 1, probes=True, nested=False),
               make_target(tmp_path, "slm", 280, 2, probes=True, nested=True),
               make_target(tmp_path, "mtp", 280, 3, probes=False, nested=False)]
    extra = tmp_path / "speech.txt"
    extra.write_text("the people are strong " * 30)
    return tokens, reference, targets, extra


def test_run_writes_report_tables_and_plots(setup, tmp_path: Path):
    tokens, reference, targets, extra = setup
    out = tmp_path / "eval"
    cfg = EvaluateConfig(baseline="ntp", extra_files=[str(extra)], max_windows=3)
    summary = run_evaluate(cfg, tokens, reference, targets, out)
    for name in ("eval_losses.parquet", "comparison.parquet", "token_dynamics.parquet", "report.md"):
        assert (out / name).is_file(), name
    for name in ("val_loss.png", "train_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    losses = pq.read_table(out / "eval_losses.parquet").to_pylist()
    assert {(r["model"], r["split"]) for r in losses} == {
        (m, s) for m in ("reference", "ntp", "slm", "mtp") for s in ("val", "ref_val", "file:speech.txt")}
    # the reference's val loss is the mean per-token loss of 3 windows spread over the split
    windows = TokenWindows.from_manifest(tokens, "val")
    inputs_BT, targets_BT = windows.batch(spread_window_ids(len(windows), 3))
    with torch.no_grad():
        direct = token_loss(load_model(Path(reference.path))(inputs_BT), targets_BT).mean().item()
    row = next(r for r in losses if r["model"] == "reference" and r["split"] == "val")
    assert row["num_tokens"] == 3 * SEQ_LEN and row["loss"] == pytest.approx(direct, rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)

    comparison = {r["model"]: r for r in pq.read_table(out / "comparison.parquet").to_pylist()}
    assert comparison["slm"]["tokens_to_baseline_val"] == 250.0
    assert comparison["slm"]["ratio_to_baseline_val"] == pytest.approx(250 / 300)
    assert comparison["slm"]["tokens_to_baseline_ref_val"] == 250.0  # ref_val curves are val + 1
    assert comparison["mtp"]["tokens_to_baseline_val"] is None and comparison["mtp"]["frac_h_to_l"] is None
    assert comparison["reference"]["tokens_to_baseline_val"] is None
    fracs = [comparison["ntp"][k] for k in ("frac_h_to_h", "frac_l_to_h", "frac_h_to_l", "frac_l_to_l")]
    assert sum(fracs) == pytest.approx(1.0)

    dynamics = pq.read_table(out / "token_dynamics.parquet")
    assert dynamics.schema == TOKEN_DYNAMICS
    assert sorted(set(dynamics["variant"].to_pylist())) == ["ntp", "slm"] and dynamics.num_rows == 64

    report = (out / "report.md").read_text()
    assert "| slm |" in report and "Unigram entropy" in report and "speech.txt" in report
    assert summary["final_losses"]["reference"]["val"] == pytest.approx(direct, rel=1e-5)
    assert 0 < summary["unigram_entropy_nats"] <= math.log(280) + 1e-9
    assert set(summary["dynamics_fractions"]) == {"ntp", "slm"}


def test_missing_extra_file_and_unknown_baseline_are_clear_errors(setup, tmp_path: Path):
    tokens, reference, targets, _ = setup
    with pytest.raises(ValueError, match="does not exist"):
        run_evaluate(EvaluateConfig(extra_files=[str(tmp_path / "nope.txt")]), tokens, reference, targets,
                     tmp_path / "a")
    with pytest.raises(ValueError, match="baseline"):
        run_evaluate(EvaluateConfig(baseline="other", max_windows=1), tokens, reference, targets, tmp_path / "b")


def test_extra_file_stream_reads_files_like_tokenize(tmp_path: Path):
    """.txt cut by extra_text_unit and .jsonl by extra_text_column, through the corpus reader: each document's
    tokens then <|endoftext|>, in file order; missing, empty and unsupported files are ValueErrors naming them."""
    import json

    from tokenizers import Tokenizer

    from stages.corpus.tokenizers import EOT
    from tests.helpers import manifest

    make_tokenizer(tmp_path / "tokenizer.json")
    tokens = manifest("tokenize_corpus", tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    (tmp_path / "notes.txt").write_text("the union is strong\n\n  \nthe people\nare free\n")
    records = [{"body": "the people are free", "quality": "high"}, {"body": "   "}, {"body": "the union", "n": 1}]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = EvaluateConfig(extra_text_unit="paragraph", extra_text_column="body")
    expected = {"notes.txt": ["the union is strong", "the people\nare free"],
                "held.jsonl": ["the people are free", "the union"]}  # the whitespace-only record is dropped
    for name, documents in expected.items():
        stream = evaluate.extra_file_stream(tokens, str(tmp_path / name), cfg)
        packed = [i for doc in documents for i in tokenizer.encode(doc, add_special_tokens=False).ids
                  + [tokenizer.token_to_id(EOT)]]
        assert stream.dtype == np.int32 and stream.tolist() == packed
    whole = evaluate.extra_file_stream(tokens, str(tmp_path / "notes.txt"), EvaluateConfig())
    assert whole.tolist().count(tokenizer.token_to_id(EOT)) == 1  # extra_text_unit="file": one document

    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "notes.md").write_text("text")
    for name, match in [("nope.jsonl", r"evaluate\.extra_files: '.*nope\.jsonl': file does not exist.*fix the path"),
                        ("blank.txt", r"evaluate\.extra_files: \['.*blank\.txt'\] has no non-empty document"),
                        ("notes.md", r"evaluate\.extra_files: '.*notes\.md' has unsupported extension '\.md'")]:
        with pytest.raises(ValueError, match=match):
            evaluate.extra_file_stream(tokens, str(tmp_path / name), cfg)
    with pytest.raises(ValueError, match=r"no field 'text' \(evaluate\.extra_text_column\)"):
        evaluate.extra_file_stream(tokens, str(tmp_path / "held.jsonl"), EvaluateConfig())


def test_selection_summary_averages_the_last_steps_of_selecting_variants():
    from stages.evaluation.curves import selection_summary
    from stages.evaluation.report import report_markdown

    slm = pa.concat_tables([curve_table([0.6] * 10, "train/selected_fraction"),
                            curve_table([5.0] * 9 + [3.0], "train/loss_selected"),
                            curve_table([6.0] * 8 + [7.0, 9.0], "train/loss_unselected")])
    ntp = curve_table([5.0] * 10, "train/loss")
    rows = selection_summary({"ntp": ntp, "slm": slm}, last_fraction=0.2)
    assert rows == [{"model": "slm", "selected_fraction": pytest.approx(0.6), "loss_selected": pytest.approx(4.0),
                     "loss_unselected": pytest.approx(8.0)}]
    assert "| slm | 60.0% | 4.0000 | 8.0000 |" in report_markdown([], 5.0, "ntp", [], rows)
