"""The train loop: schedule, optimizer groups, data order, outputs, exact resume (also after kill -9), NaN stop."""

import math
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

from schemas.configs import TargetVariant
from schemas.tables import METRICS, PROBE_LOSSES
from stages.models.gpt import GPT
from stages.objectives.base import ObjectiveBase
from stages.objectives.token_prediction import TokenPrediction
from stages.training.data import WindowOrder
from stages.training.optim import lr_at, param_groups
from storage.checkpoints import list_checkpoints, load_checkpoint
from tests.helpers import TINY_MODEL, make_token_artifact, tiny_run, tiny_train_config

REPO = Path(__file__).resolve().parents[3]


class Interrupt(Exception):
    """Raised from on_step to simulate a crash."""


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_artifact(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def uninterrupted(tokens, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    return work, tiny_run(tokens, work)


def _metrics(work: Path) -> list[tuple]:
    rows = pq.read_table(work / "metrics.parquet").to_pylist()
    return [tuple(r.values()) for r in rows if r["name"] != "train/tokens_per_s"]  # timing differs run to run


def _assert_same_run(work_a: Path, work_b: Path) -> None:
    weights_a, weights_b = load_file(work_a / "model.safetensors"), load_file(work_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # bitwise on CPU
    assert _metrics(work_a) == _metrics(work_b)
    assert pq.read_table(work_a / "probe_losses.parquet").equals(pq.read_table(work_b / "probe_losses.parquet"))


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = tiny_train_config(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 20) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, cfg, 20) == pytest.approx(1e-3)
    assert lr_at(4 + 15 // 2, cfg, 20) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 7 / 15)))
    assert lr_at(19, cfg, 20) == pytest.approx(1e-4)
    assert lr_at(0, tiny_train_config(warmup_steps=0, lr=2e-3), 10) == pytest.approx(2e-3)


def test_weight_decay_only_on_matrices():
    model = GPT(TINY_MODEL, 64, 16)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.embed.weight for p in decay["params"])  # embedding (tied unembedding) decays
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_window_order_shuffles_per_epoch_wraps_and_resumes():
    order = WindowOrder(5, seed=7)
    ids = order.take(12)
    assert sorted(ids[:5]) == list(range(5)) and sorted(ids[5:10]) == list(range(5))
    assert list(ids[:5]) == list(np.random.default_rng(7).permutation(5))
    assert order.state() == {"epoch": 2, "position": 2}
    resumed = WindowOrder(5, seed=7, **order.state())
    assert list(resumed.take(4)) == list(order.take(4))


def test_outputs_metrics_and_probe_rows(uninterrupted, tokens):
    work, summary = uninterrupted
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 128
    assert set(summary["val_loss"]) == {"val", "ref_val"} and summary["num_params"] > 0
    assert {p.name for p in work.iterdir()} == {"model.safetensors", "model.json", "metrics.parquet",
                                                "probe_losses.parquet"}  # checkpoints removed
    metrics = pq.read_table(work / "metrics.parquet")
    assert metrics.schema.equals(METRICS)
    names = set(metrics["name"].to_pylist())
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/head1/loss",
            "val/val/loss", "val/val/ppl", "val/ref_val/loss"} <= names
    rows = metrics.to_pylist()
    # at step 0 (the untrained model), every 4 steps and at the end
    assert [r["step"] for r in rows if r["name"] == "val/val/loss"] == [0, 4, 8]
    assert [r["tokens_seen"] for r in rows if r["name"] == "val/val/loss"] == [0, 4 * 128, 8 * 128]
    train_loss = [r["value"] for r in rows if r["name"] == "train/loss"]
    assert len(train_loss) == 8 and train_loss[-1] < train_loss[0]
    assert summary["train_loss"] == train_loss[-1]
    probe = pq.read_table(work / "probe_losses.parquet")
    assert probe.schema.equals(PROBE_LOSSES) and probe.num_rows == 3 * 3 * 16  # 3 evals x 3 windows x T
    first = probe.filter(probe["step"].to_numpy() == 4)
    assert first["token_index"].to_pylist() == list(range(1, 3 * 16 + 1))
    assert set(first["split"].to_pylist()) == {"val"}


def test_resume_after_exception_equals_uninterrupted(uninterrupted, tokens, tmp_path):
    def crash(step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        tiny_run(tokens, tmp_path, on_step=crash)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    summary = tiny_run(tokens, tmp_path)
    assert summary["resumed_from_step"] == 3
    _assert_same_run(uninterrupted[0], tmp_path)


CHILD = """
import sys, time
from pathlib import Path
from tests.helpers import make_token_artifact, tiny_run
tokens = make_token_artifact(Path(sys.argv[1]))
def stall(step):
    if step == 4:  # step 3 is checkpointed; step 4 is done but will be lost with the process
        Path(sys.argv[3]).write_text("ready")
        time.sleep(60)
tiny_run(tokens, Path(sys.argv[2]), on_step=stall)
"""


@pytest.mark.multiprocess  # a child process killed or signalled
def test_resume_after_kill_9_equals_uninterrupted(uninterrupted, tmp_path):
    marker, work = tmp_path / "marker", tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "tokens"), str(work), str(marker)],
                             cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert marker.exists() and [s for s, _ in list_checkpoints(work / "checkpoints")] == [3]
    tokens = make_token_artifact(tmp_path / "tokens")
    assert tiny_run(tokens, work)["resumed_from_step"] == 3
    _assert_same_run(uninterrupted[0], work)


class NanAfter(ObjectiveBase):
    """Wraps an objective; its loss turns NaN after `calls` micro-batches."""

    def __init__(self, calls: int):
        self.inner, self.calls = TokenPrediction(TINY_MODEL, TargetVariant(name="ntp")), calls

    def build_model(self, vocab_size, seq_len, generator=None):
        return self.inner.build_model(vocab_size, seq_len, generator)

    def loss(self, model, batch):
        out = self.inner.loss(model, batch)
        self.calls -= 1
        if self.calls < 0:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tokens, tmp_path, uninterrupted):
    with pytest.raises(RuntimeError, match=r"non-finite training loss .* step 5\. Try a lower train\.lr"):
        tiny_run(tokens, tmp_path, objective=NanAfter(calls=8))  # 2 micro-batches per step: step 5 fails
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert load_checkpoint(tmp_path / "checkpoints" / "step-000003")["run"]["step"] == 3
    assert not (tmp_path / "metrics.parquet").exists() and not (tmp_path / "model.safetensors").exists()
    tiny_run(tokens, tmp_path)  # a fixed run resumes from the good checkpoint
    _assert_same_run(uninterrupted[0], tmp_path)


def test_batch_size_must_be_a_multiple_of_the_micro_batch(tokens, tmp_path):
    with pytest.raises(ValueError, match="batch_size_tokens"):
        tiny_run(tokens, tmp_path, tiny_train_config(batch_size_tokens=100))


SIGNAL_CHILD = """
import sys, time
from pathlib import Path
from stages.runtime.interrupt import Interrupted, install_handlers
from tests.helpers import make_token_artifact, tiny_run
install_handlers()
tokens = make_token_artifact(Path(sys.argv[1]))
def slow(step):
    if step == 2:
        Path(sys.argv[3]).write_text("ready")
    time.sleep(0.5)
try:
    tiny_run(tokens, Path(sys.argv[2]), on_step=slow)
except Interrupted as err:
    print(err)
    sys.exit(143)
"""


@pytest.mark.multiprocess  # a child process killed or signalled
def test_sigterm_checkpoints_at_the_step_boundary_and_the_rerun_resumes(uninterrupted, tmp_path):
    marker, work = tmp_path / "marker", tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, str(tmp_path / "tokens"), str(work), str(marker)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 143 and time.monotonic() - sent < 5
    assert "run the same command again to resume" in out
    saved = [s for s, _ in list_checkpoints(work / "checkpoints")]
    assert saved and 2 <= saved[-1] < 8
    tokens = make_token_artifact(tmp_path / "tokens")
    assert tiny_run(tokens, work)["resumed_from_step"] == saved[-1]
    _assert_same_run(uninterrupted[0], work)


def _slm_step_run(tokens, work_dir: Path, on_step=None) -> dict:
    """tiny_run's run with Rho-1 selection by excess loss ranked over the whole step (random reference scores)."""
    from schemas.configs import SelectionConfig
    from stages.training.loop import ProbeSet, TrainRun, train
    from storage.windows import TokenWindows

    selection = SelectionConfig(kind="top_k", score="excess_loss", keep_ratio=0.5, rank_over="step")
    objective = TokenPrediction(TINY_MODEL, TargetVariant(name="slm", selection=selection))
    windows = TokenWindows.from_manifest(tokens, "train")
    rng = np.random.default_rng(0)
    lookups = {name: rng.random(windows.num_tokens + 1).astype(np.float32) for name in ("ref_loss", "ref_entropy")}
    val = {split: TokenWindows.from_manifest(tokens, split) for split in ("val", "ref_val")}
    return train(TrainRun(objective, windows, val, tiny_train_config(), work_dir,
                          vocab_size=int(tokens.summary["vocab_size"]), label="slm", lookups=lookups,
                          probe=ProbeSet("val", np.arange(3))), on_step)


def test_step_ranked_selection_resumes_exactly(tokens, tmp_path):
    """rank_over="step" keeps nothing across steps but the selection counters: a resumed run is the same run."""
    _slm_step_run(tokens, tmp_path / "whole")

    def crash(step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        _slm_step_run(tokens, tmp_path / "resumed", on_step=crash)
    assert _slm_step_run(tokens, tmp_path / "resumed")["resumed_from_step"] == 3
    _assert_same_run(tmp_path / "whole", tmp_path / "resumed")
    selection = [pq.read_table(tmp_path / run / "token_selection.parquet") for run in ("whole", "resumed")]
    assert selection[0].equals(selection[1]) and sum(selection[0]["times_selected"].to_pylist()) == 8 * 64


def test_the_runs_stop_file_is_a_stop_request(tmp_path, monkeypatch):
    """What a cluster worker sees: the stop file named by $LMPIPE_STOP_FILE (inherited from `lmpipe run`)."""
    from stages.runtime import interrupt

    monkeypatch.setattr(interrupt, "STOP", type(interrupt.STOP)())  # this test's own flag
    with interrupt.stop_file_for_run(tmp_path / "_stop") as stop_file:
        assert os.environ[interrupt.STOP_FILE_ENV] == stop_file and not interrupt.requested()
        interrupt.announce_stop(stop_file)  # the signal handler of the run's process does this
        assert interrupt.requested()
        with pytest.raises(interrupt.Interrupted, match="stopped by a signal: shard x"):
            interrupt.check("shard x")
    assert interrupt.STOP_FILE_ENV not in os.environ and not os.path.exists(stop_file)


def test_a_task_run_watches_the_stop_file_it_was_given(tmp_path, monkeypatch):
    """A worker started elsewhere has no $LMPIPE_STOP_FILE: the task run's parameter names the run's stop file,
    for that task run only (another run's task runs in the same worker process go on)."""
    import threading

    from stages.runtime import interrupt

    monkeypatch.setattr(interrupt, "STOP", type(interrupt.STOP)())
    monkeypatch.delenv(interrupt.STOP_FILE_ENV, raising=False)
    ours, theirs = str(tmp_path / "run-a"), str(tmp_path / "run-b")
    seen = {}

    def task_run(name: str, stop_file: str) -> None:
        with interrupt.watching(stop_file):
            seen[name] = interrupt.requested()

    interrupt.announce_stop(ours)
    threads = [threading.Thread(target=task_run, args=args) for args in (("a", ours), ("b", theirs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": True, "b": False} and not interrupt.requested()  # outside a task run: no stop file


def test_a_stop_file_in_the_object_store_reaches_workers_on_other_machines(s3_root, monkeypatch):
    """With a bucket root the stop file is an object: a worker anywhere sees it, polling every few seconds."""
    import fsspec

    from stages.runtime import interrupt

    monkeypatch.setattr(interrupt, "STOP", type(interrupt.STOP)())
    monkeypatch.setattr(interrupt, "STOP_POLL_SECONDS", 0.0)
    with interrupt.stop_file_for_run(f"{s3_root}/_stop") as stop_file:
        assert stop_file.startswith(f"{s3_root}/_stop/run-") and not interrupt.requested()
        interrupt.announce_stop(stop_file)  # a background PUT: the handler must not block on the network
        deadline = time.monotonic() + 10
        while not interrupt.requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert interrupt.requested() and fsspec.filesystem("s3").exists(stop_file.removeprefix("s3://"))
    assert not fsspec.filesystem("s3", skip_instance_cache=True).exists(stop_file.removeprefix("s3://"))


def test_each_stop_file_in_the_bucket_is_polled_on_its_own_clock(s3_root, monkeypatch):
    """Task runs of two runs in one worker process: a poll of one run's stop file does not delay the other's."""
    import fsspec

    from stages.runtime import interrupt

    monkeypatch.setattr(interrupt, "STOP", type(interrupt.STOP)())
    monkeypatch.setattr(interrupt, "STOP_POLL_SECONDS", 60.0)
    first, second = f"{s3_root}/_stop/run-a", f"{s3_root}/_stop/run-b"
    fsspec.filesystem("s3").pipe_file(second.removeprefix("s3://"), b"stop")
    with interrupt.watching(first):
        assert not interrupt.requested()
    with interrupt.watching(second):
        assert interrupt.requested()
