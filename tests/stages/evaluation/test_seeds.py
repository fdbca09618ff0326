"""Seed aggregation (stages/evaluation/seeds.py): mean, spread and the within-spread flag per variant."""

import math

import pytest

from stages.evaluation.seeds import seed_rows


def test_mean_std_and_within_spread_flag():
    per_model = {
        "ntp": {"val_loss": 5.0}, "ntp.seed1": {"val_loss": 5.2}, "ntp.seed2": {"val_loss": 5.1},
        "slm": {"val_loss": 5.05}, "slm.seed1": {"val_loss": 5.15}, "slm.seed2": {"val_loss": 5.10},
        "kd": {"val_loss": 4.60}, "kd.seed1": {"val_loss": 4.62}, "kd.seed2": {"val_loss": 4.58},
    }
    rows = {r["variant"]: r for r in seed_rows(per_model, "ntp", metrics=("val_loss",))}
    assert rows["ntp"]["runs"] == rows["ntp"]["models"] == 3
    assert rows["ntp"]["mean"] == pytest.approx(5.1) and rows["ntp"]["std"] == pytest.approx(0.1)
    assert (rows["ntp"]["min"], rows["ntp"]["max"]) == (5.0, 5.2)
    assert rows["ntp"]["diff_to_baseline"] is None and rows["ntp"]["within_spread"] is None
    assert rows["slm"]["diff_to_baseline"] == pytest.approx(0.0, abs=1e-12)
    assert rows["slm"]["diff_spread"] == pytest.approx(math.hypot(0.05, 0.1))
    assert rows["slm"]["within_spread"] is True
    assert rows["kd"]["diff_to_baseline"] == pytest.approx(-0.5) and rows["kd"]["within_spread"] is False


def test_missing_values_and_single_runs():
    per_model = {"ntp": {"tokens": 300.0}, "slm": {"tokens": None}, "mtp": {"tokens": 200.0},
                 "mtp.seed1": {"tokens": float("nan")}}
    rows = {r["variant"]: r for r in seed_rows(per_model, "ntp", metrics=("tokens",))}
    assert rows["slm"]["runs"] == 0 and rows["slm"]["models"] == 1 and rows["slm"]["mean"] is None
    assert rows["mtp"]["runs"] == 1 and rows["mtp"]["models"] == 2 and rows["mtp"]["std"] is None
    assert rows["mtp"]["diff_to_baseline"] == -100.0 and rows["mtp"]["within_spread"] is None
