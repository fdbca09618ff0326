"""Tokens-to-reach over seeds (stages/evaluation/seeds.reach_rows) on hand-made validation curves: mean ± std of
the crossing fraction, the count of runs that reach ntp's mean final loss, and `not a finding` within the
spread of ntp's own crossing."""

import numpy as np
import pyarrow as pa
import pytest

from stages.evaluation.curves import eval_resolution, tokens_to_reach
from stages.evaluation.report import reach_markdown
from stages.evaluation.seeds import reach_rows

TOKENS = np.arange(0, 1001, 100)  # an evaluation every 10% of a 1,000-token budget


def curve(values) -> pa.Table:
    """A metrics table with one `val/val/loss` point per entry of TOKENS."""
    values = np.asarray(values, float)
    return pa.table({"step": np.arange(len(values)), "tokens_seen": TOKENS[:len(values)],
                     "name": ["val/val/loss"] * len(values), "value": values})


def linear(slope: float) -> pa.Table:
    """Loss 6 - slope * tokens."""
    return curve(6.0 - slope * TOKENS)


def rows_of(metrics: dict[str, pa.Table]) -> dict[str, dict]:
    baseline = [name for name in metrics if name.split(".")[0] == "ntp"]
    reach = tokens_to_reach(metrics, baseline, "val")
    per_model = {name: {"ratio_to_baseline_val": ratio} for name, (_, ratio) in reach.items()}
    rows = reach_rows(per_model, "ntp", eval_resolution(metrics, baseline), metrics=("ratio_to_baseline_val",))
    return {r["variant"]: r for r in rows}


def test_crossings_over_seeds_with_counts_and_findings():
    # ntp's finals 5.0, 5.1, 5.2 (mean 5.1): its runs cross 5.1 at 900 and 1000 tokens, the third never
    metrics = {"ntp": linear(0.001), "ntp.seed1": linear(0.0009), "ntp.seed2": linear(0.0008),
               # crosses 5.1 at 600, 625 and 562.5 tokens: far earlier than ntp
               "fast": linear(0.0015), "fast.seed1": linear(0.00144), "fast.seed2": linear(0.0016),
               # crosses at 947 and 900 tokens: inside ntp's own spread
               "close": linear(0.00095), "close.seed1": linear(0.001),
               "slow": linear(0.0005)}  # 5.5 at the end: never
    rows = rows_of(metrics)
    ntp = rows["ntp"]
    assert (ntp["runs"], ntp["models"]) == (2, 3)
    assert ntp["mean"] == pytest.approx(0.95) and ntp["std"] == pytest.approx(np.std([0.9, 1.0], ddof=1))
    assert eval_resolution(metrics, ["ntp"]) == pytest.approx(0.1)
    assert ntp["diff_spread"] == pytest.approx(0.1)  # the evaluation interval exceeds the std (0.071)
    fast = rows["fast"]
    assert (fast["runs"], fast["models"]) == (3, 3)
    assert fast["mean"] == pytest.approx(np.mean([0.6, 0.625, 0.5625]))
    assert fast["std"] == pytest.approx(np.std([0.6, 0.625, 0.5625], ddof=1))
    assert fast["diff_to_baseline"] == pytest.approx(fast["mean"] - 0.95)
    assert fast["within_spread"] is False  # a finding
    assert rows["close"]["within_spread"] is True  # not a finding
    assert rows["slow"]["runs"] == 0 and rows["slow"]["within_spread"] is None
    text = reach_markdown(list(rows.values()), "ntp")
    assert "| close | 0.92 ± 0.03 (2/2), not a finding |" in text
    assert "| fast | 0.60 ± 0.03 (3/3), finding (-0.35) |" in text
    assert "| slow | never |" in text and "| ntp | 0.95 ± 0.07 (2/3), spread 0.10 |" in text


def test_one_run_is_judged_against_how_early_ntp_reaches_its_own_final_level():
    plateau = [6.0, 5.8, 5.6, 5.4, 5.2, 5.1, 5.05, 5.03, 5.0, 5.02, 5.01]  # final 5.01, first below at 800
    metrics = {"ntp": curve(plateau), "near": linear(0.00125),  # reaches 5.01 at 792 tokens
               "early": linear(0.002)}  # reaches it at 495 tokens
    rows = rows_of(metrics)
    assert rows["ntp"]["std"] is None
    crossing = 0.7 + 0.1 * (5.03 - 5.01) / 0.03  # 0.767
    assert rows["ntp"]["mean"] == pytest.approx(crossing)
    assert rows["ntp"]["diff_spread"] == pytest.approx(1 - crossing)
    assert rows["near"]["within_spread"] is True
    assert rows["early"]["within_spread"] is False
