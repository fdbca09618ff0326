"""Tests of the Rho-1 token-loss dynamics classification on hand-made loss trajectories."""

import numpy as np
import pyarrow as pa
import pytest

from schemas.tables import TOKEN_DYNAMICS
from stages.evaluation.dynamics import CATEGORIES, classify, fit_lines, fractions


def probe_table(trajectories: dict, split: str = "val", steps: list[int] | None = None) -> pa.Table:
    """PROBE_LOSSES-like rows from {token_index: [loss at each checkpoint]}."""
    rows = []
    for token_index, losses in trajectories.items():
        for i, loss in enumerate(losses):
            step = steps[i] if steps else 10 * i
            rows.append({"step": step, "tokens_seen": 100 * step, "split": split, "token_index": token_index,
                         "loss": loss})
    return pa.Table.from_pylist(rows)


def by_token(table: pa.Table) -> dict:
    return {row["token_index"]: row for row in table.to_pylist()}


def test_each_category_from_hand_made_trajectories():
    probe = probe_table({
        5: [3.0, 2.0, 1.0],   # falls by 2 -> H->L
        6: [1.0, 2.0, 3.0],   # rises by 2 -> L->H
        7: [1.0, 1.05, 1.0],  # flat, ends at 1.0 <= mean of last losses (2.5) -> L->L
        8: [5.0, 5.0, 5.0],   # flat, ends at 5.0 > 2.5 -> H->H
    })
    table = classify(probe, 0.2, variant="slm")
    assert table.schema == TOKEN_DYNAMICS
    rows = by_token(table)
    assert {i: r["category"] for i, r in rows.items()} == {5: "H->L", 6: "L->H", 7: "L->L", 8: "H->H"}
    assert rows[5]["loss_start"] == pytest.approx(3.0) and rows[5]["loss_end"] == pytest.approx(1.0)
    assert rows[5]["delta"] == pytest.approx(-2.0) and rows[5]["loss_last"] == pytest.approx(1.0)
    assert rows[7]["loss_start"] == pytest.approx(3.05 / 3) and rows[7]["delta"] == pytest.approx(0.0, abs=1e-6)
    assert set(table["variant"].to_pylist()) == {"slm"}
    assert fractions(table) == {"H->H": 0.25, "L->H": 0.25, "H->L": 0.25, "L->L": 0.25}


def test_threshold_boundaries_are_exclusive():
    probe = probe_table({1: [1.0, 1.5], 2: [1.5, 1.0], 3: [0.5, 0.5]})  # deltas +0.5, -0.5, 0 (exact in binary)
    at = by_token(classify(probe, 0.5))  # mean of last losses = (1.5 + 1.0 + 0.5) / 3 = 1.0
    assert at[1]["category"] == "H->H"  # |delta| == threshold is not a change; last 1.5 > 1.0
    assert at[2]["category"] == "L->L"  # last 1.0 == mean counts as low
    assert at[3]["category"] == "L->L"
    below = by_token(classify(probe, 0.49))
    assert below[1]["category"] == "L->H" and below[2]["category"] == "H->L" and below[3]["category"] == "L->L"


def test_fit_matches_polyfit_and_row_order_does_not_matter():
    rng = np.random.default_rng(0)
    losses_NC = rng.normal(3.0, 1.0, (50, 6))
    start_N, end_N = fit_lines(losses_NC)
    for row, start, end in zip(losses_NC, start_N, end_N, strict=True):
        slope, intercept = np.polyfit(np.arange(6), row, 1)
        assert start == pytest.approx(intercept) and end == pytest.approx(intercept + 5 * slope)
    probe = probe_table({i: list(row) for i, row in enumerate(losses_NC)}, steps=[0, 3, 7, 20, 21, 50])
    shuffled = probe.take(pa.array(rng.permutation(probe.num_rows)))
    assert classify(shuffled, 0.2).equals(classify(probe, 0.2))
    assert classify(probe, 0.2)["token_index"].to_pylist() == list(range(50))


def test_lines_are_fitted_against_tokens_seen():
    """Checkpoints at steps 0, 10, 20, 22 (a short last interval): a loss linear in tokens seen is fitted
    exactly, start at step 0 and end at the last checkpoint; fitting against the checkpoint index would not."""
    steps = [0, 10, 20, 22]
    probe = probe_table({1: [5.0 - 0.1 * s for s in steps]}, steps=steps)
    row = by_token(classify(probe, 0.2))[1]
    assert row["loss_start"] == pytest.approx(5.0) and row["loss_end"] == pytest.approx(2.8)
    start_by_index, end_by_index = fit_lines(np.array([[5.0 - 0.1 * s for s in steps]]))
    assert abs(end_by_index[0] - start_by_index[0] + 2.2) > 0.05


def test_fractions_sum_to_one_and_mean_is_per_split():
    rng = np.random.default_rng(1)
    val = probe_table({i: list(rng.normal(3, 1, 4)) for i in range(40)}, split="val")
    ref_val = probe_table({i: list(rng.normal(9, 1, 4)) for i in range(40)}, split="ref_val")
    table = classify(pa.concat_tables([val, ref_val]), 0.2)
    shares = fractions(table)
    assert set(shares) == set(CATEGORIES) and sum(shares.values()) == pytest.approx(1.0)
    assert table["split"].to_pylist() == ["ref_val"] * 40 + ["val"] * 40
    # each split is judged against its own L_mean (val: 3, ref_val: 9), not the pooled one (6)
    two = pa.concat_tables([probe_table({1: [2.0, 2.0], 2: [4.0, 4.0]}, split="val"),
                            probe_table({1: [8.0, 8.0], 2: [10.0, 10.0]}, split="ref_val")])
    categories = {(r["split"], r["token_index"]): r["category"] for r in classify(two, 0.2).to_pylist()}
    assert categories == {("val", 1): "L->L", ("val", 2): "H->H", ("ref_val", 1): "L->L", ("ref_val", 2): "H->H"}


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=">= 2 checkpoints"):
        classify(probe_table({1: [1.0], 2: [2.0]}), 0.2)
    incomplete = probe_table({1: [1.0, 2.0, 3.0], 2: [1.0, 2.0, 3.0]}).slice(0, 5)
    with pytest.raises(ValueError, match="missing"):
        classify(incomplete, 0.2)
    with pytest.raises(ValueError, match="threshold"):
        classify(probe_table({1: [1.0, 2.0]}), 0.0)
