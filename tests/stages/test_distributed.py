"""Training on 2 processes (torch's elastic launcher, gloo on the CPU) against 1 process with the same config: the
same data order, loss curve, selections and final weights (to float tolerance), for ddp and fsdp; a 2-process run
killed with kill -9 resumes, at 2 processes or at 1."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from schemas.configs import SelectionConfig, TargetVariant
from stages.objectives.token_prediction import TokenPrediction
from stages.training.loop import ProbeSet, train
from storage.checkpoints import list_checkpoints
from storage.windows import TokenWindows
from tests.helpers import TINY_MODEL, make_token_artifact, tiny_train_config
from tests.processes import REPO

TOLERANCE = dict(rtol=1e-4, atol=1e-5)
VARIANTS = {
    "ntp": TargetVariant(name="ntp"),
    # selection ranked over the whole step (each rank trains on part of it) and two heads' sequential backward
    "slm_mtp2": TargetVariant(name="slm_mtp2", num_future_tokens=2,
                              selection=SelectionConfig(kind="top_k", score="reference_loss", keep_ratio=0.5,
                                                        rank_over="step")),
}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_artifact(tmp_path_factory.mktemp("tokens"))


def run(tokens, work: Path, variant: str = "ntp", **train_overrides) -> dict:
    """Train VARIANTS[variant] on the tiny stream (4 micro-batches per step, checkpoints every 3 steps)."""
    windows = TokenWindows.from_manifest(tokens, "train")
    rng = np.random.default_rng(0)
    lookups = {name: rng.random(windows.num_tokens + 1).astype(np.float32) for name in ("ref_loss", "ref_entropy")}
    cfg = tiny_train_config(batch_size_tokens=256, max_tokens=8 * 256, **train_overrides)
    val = {split: TokenWindows.from_manifest(tokens, split) for split in ("val", "ref_val")}
    return train(TokenPrediction(TINY_MODEL, VARIANTS[variant]), windows, val, cfg, work, vocab_size=64,
                 label=variant, lookups=lookups, probe=ProbeSet("val", np.arange(3)), meta={})


def metrics(work: Path) -> dict[tuple[int, str], float]:
    rows = pq.read_table(work / "metrics.parquet").to_pylist()
    return {(r["step"], r["name"]): r["value"] for r in rows if r["name"] != "train/tokens_per_s"}


def assert_same_training(a: Path, b: Path) -> None:
    """Same steps and metric names; losses, norms and weights equal to float tolerance; probe rows aligned."""
    ma, mb = metrics(a), metrics(b)
    assert ma.keys() == mb.keys()
    names = sorted(ma)
    np.testing.assert_allclose([mb[k] for k in names], [ma[k] for k in names], **TOLERANCE)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], **TOLERANCE)
    pa_, pb = (pq.read_table(w / "probe_losses.parquet") for w in (a, b))
    assert pa_.column("token_index").equals(pb.column("token_index"))
    np.testing.assert_allclose(pb["loss"].to_numpy(), pa_["loss"].to_numpy(), **TOLERANCE)


@pytest.fixture(scope="module")
def single(tokens, tmp_path_factory):
    """One-process runs of every variant, the reference for the multi-process ones."""
    root = tmp_path_factory.mktemp("single")
    for variant in VARIANTS:
        run(tokens, root / variant, variant)
    return root


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_processes_train_like_one(tokens, single, tmp_path, variant, parallelism):
    summary = run(tokens, tmp_path, variant, num_processes=2, parallelism=parallelism)
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 256
    assert_same_training(single / variant, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    if variant != "ntp":  # exactly the same tokens selected: every rank's counts summed
        one, two = (pq.read_table(w / "token_selection.parquet") for w in (single / variant, tmp_path))
        assert one.equals(two)


def test_micro_batches_must_divide_among_processes(tokens, tmp_path):
    with pytest.raises(ValueError, match=r"4 micro-batches .* 3 processes cannot share evenly"):
        run(tokens, tmp_path, num_processes=3)


CHILD = """
import sys
from pathlib import Path
from tests.helpers import make_token_artifact
from tests.stages.test_distributed import run
run(make_token_artifact(Path(sys.argv[1])), Path(sys.argv[2]), "slm_mtp2", num_processes=2, parallelism=sys.argv[3])
"""


@pytest.mark.parametrize(("parallelism", "resume_processes"), [("fsdp", 2), ("ddp", 1)])
def test_kill_9_of_a_two_process_run_resumes(tokens, single, tmp_path, parallelism, resume_processes):
    """kill -9 of the launching process once a checkpoint exists takes its workers with it; the re-run resumes from
    that checkpoint, at 2 processes or at 1 (the checkpoint is resharded on load), and ends as the uninterrupted
    run."""
    work = tmp_path / "work"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "tokens"), str(work), parallelism],
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    deadline = time.monotonic() + 120
    while not list_checkpoints(work / "checkpoints") and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the launcher and its workers, as a killed job step would
    child.wait(timeout=10)
    saved = [step for step, _ in list_checkpoints(work / "checkpoints")]
    assert saved and not (work / "model.safetensors").exists()
    summary = run(tokens, work, "slm_mtp2", num_processes=resume_processes, parallelism=parallelism)
    assert summary["resumed_from_step"] == saved[-1]
    assert_same_training(single / "slm_mtp2", work)
    one, two = (pq.read_table(w / "token_selection.parquet") for w in (single / "slm_mtp2", work))
    assert one.equals(two)
