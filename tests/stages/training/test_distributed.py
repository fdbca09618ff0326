"""Training on 2 processes (torch's elastic launcher, gloo on the CPU) against 1 process with the same config: the
same data order, loss curve, selections and final weights (to float tolerance), for ddp and fsdp; two nodes meet
at a rendezvous endpoint; a 2-process run killed with kill -9 resumes, at 2 processes or at 1 (marked `fault`)."""

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
from stages.training.loop import ProbeSet, TrainRun, train
from storage.checkpoints import list_checkpoints
from storage.windows import TokenWindows
from tests.helpers import TINY_MODEL, make_token_artifact, tiny_train_config
from tests.processes import REPO

pytestmark = pytest.mark.multiprocess

TOLERANCE = dict(rtol=1e-4, atol=1e-5)
VARIANTS = {
    "ntp": TargetVariant(name="ntp"),
    "slm": TargetVariant(name="slm", selection=SelectionConfig(kind="top_k", score="reference_loss", keep_ratio=0.5)),
    # selection ranked over the whole step (each rank trains on part of it) and two heads' sequential backward
    "slm_mtp2": TargetVariant(name="slm_mtp2", num_future_tokens=2,
                              selection=SelectionConfig(kind="top_k", score="reference_loss", keep_ratio=0.5,
                                                        rank_over="step")),
}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_artifact(tmp_path_factory.mktemp("tokens"))


GQA_MODEL = TINY_MODEL.model_copy(update={"num_kv_heads": 1})
"""TINY_MODEL with grouped-query attention (2 query heads share 1 key/value head)."""


def run(tokens, work: Path, variant: str = "ntp", model=TINY_MODEL, **train_overrides) -> dict:
    """Train VARIANTS[variant] on the tiny stream (4 micro-batches per step, checkpoints every 3 steps)."""
    windows = TokenWindows.from_manifest(tokens, "train")
    rng = np.random.default_rng(0)
    lookups = {name: rng.random(windows.num_tokens + 1).astype(np.float32) for name in ("ref_loss", "ref_entropy")}
    cfg = tiny_train_config(batch_size_tokens=256, max_tokens=8 * 256, **train_overrides)
    val = {split: TokenWindows.from_manifest(tokens, split) for split in ("val", "ref_val")}
    return train(TrainRun(TokenPrediction(model, VARIANTS[variant]), windows, val, cfg, work, vocab_size=64,
                          label=variant, lookups=lookups, probe=ProbeSet("val", np.arange(3))))


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
    if variant != "ntp":  # every rank's counts summed
        one, two = (pq.read_table(w / "token_selection.parquet") for w in (single / variant, tmp_path))
        assert one.select(["split", "token_index", "times_seen"]).equals(two.select(["split", "token_index",
                                                                                     "times_seen"]))
        selected_one, selected_two = (t["times_selected"].to_numpy() for t in (one, two))
        assert selected_one.sum() == selected_two.sum()  # exactly k per micro-batch / per step on every rank
        # which tokens make the cut can differ where two excess losses are within float error of the threshold:
        # the processes' matmuls reduce in another order (other batch shapes), so agreement, not identity
        assert (selected_one == selected_two).mean() > 0.99


def test_grouped_query_attention_trains_on_two_processes_like_one(tokens, tmp_path):
    run(tokens, tmp_path / "one", "ntp", GQA_MODEL)
    run(tokens, tmp_path / "two", "ntp", GQA_MODEL, num_processes=2, parallelism="ddp")
    assert load_file(tmp_path / "one" / "model.safetensors")["trunk_blocks.0.attn.k_proj.weight"].shape == (16, 32)
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_micro_batches_must_divide_among_processes(tokens, tmp_path):
    with pytest.raises(ValueError, match=r"4 micro-batches .* 3 processes cannot share evenly"):
        run(tokens, tmp_path, num_processes=3)


CHILD = """
import sys
from pathlib import Path
from tests.helpers import make_token_artifact
from tests.stages.training.test_distributed import run
run(make_token_artifact(Path(sys.argv[1])), Path(sys.argv[2]), "slm_mtp2", num_processes=2, parallelism=sys.argv[3])
"""


def _workers(pid: int) -> list[int]:
    """The training workers among pid's descendants (multiprocessing spawn children, not its resource tracker)."""
    from flows.watchdog import descendants

    found = []
    for child in descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return sorted(found)


@pytest.mark.fault  # ~80 s: with the fault suite (CI runs it after the default suite)
@pytest.mark.parametrize(("parallelism", "killed", "resume_processes"),
                         [("fsdp", "launcher", 2), ("ddp", "launcher", 1), ("ddp", "one rank", 2)])
def test_kill_9_of_a_two_process_run_resumes(tokens, single, tmp_path, parallelism, killed, resume_processes):
    """kill -9 once a checkpoint exists, of the launching process (its workers die with it) or of one rank (the
    launcher stops the other rank and fails, naming it); the re-run resumes from that checkpoint, at 2 processes or
    at 1 (the checkpoint is resharded on load), and ends as the uninterrupted run."""
    work, log = tmp_path / "work", tmp_path / "launcher.log"
    with open(log, "wb") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "tokens"), str(work), parallelism],
                                 cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=stderr)
    deadline = time.monotonic() + 120
    while not list_checkpoints(work / "checkpoints") and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _workers(child.pid)
    assert len(workers) == 2, workers
    if killed == "launcher":
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    else:
        os.kill(workers[-1], signal.SIGKILL)
        assert child.wait(timeout=60) != 0
        assert b"ChildFailedError" in log.read_bytes() and b"Signal 9 (SIGKILL)" in log.read_bytes()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived the run"
    saved = [step for step, _ in list_checkpoints(work / "checkpoints")]
    assert saved and not (work / "model.safetensors").exists()
    summary = run(tokens, work, "slm_mtp2", num_processes=resume_processes, parallelism=parallelism)
    assert summary["resumed_from_step"] == saved[-1]
    assert_same_training(single / "slm_mtp2", work)
    one, two = (pq.read_table(w / "token_selection.parquet") for w in (single / "slm_mtp2", work))
    assert one.equals(two)


NODE = """
import sys
from pathlib import Path
from tests.helpers import make_token_artifact
from tests.stages.training.test_distributed import run
run(make_token_artifact(Path(sys.argv[1])), Path(sys.argv[2]), "ntp", num_processes=1, num_nodes=2,
    rdzv_endpoint=sys.argv[3])
"""


def test_two_nodes_meet_at_the_rendezvous_endpoint(single, tmp_path):
    """Two "nodes" (processes on this machine, each calling train with num_nodes=2 and the same endpoint) form one
    2-rank run; the node that gets rank 0 writes the model, equal to the 1-process one to float tolerance."""
    from tests.processes import free_port, lmpipe_env

    endpoint = f"localhost:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-c", NODE, str(tmp_path / f"tokens{i}"), str(tmp_path / f"node{i}"),
                               endpoint], cwd=REPO, env=lmpipe_env(tmp_path))
             for i in range(2)]
    assert [node.wait(timeout=300) for node in nodes] == [0, 0]
    written = [tmp_path / f"node{i}" for i in range(2) if (tmp_path / f"node{i}" / "model.safetensors").exists()]
    assert len(written) == 1
    assert_same_training(single / "ntp", written[0])


JOINED = """
import logging
import sys
from pathlib import Path
import os
logging.basicConfig(level=logging.INFO)
from tests.helpers import make_token_artifact
from tests.stages.training.test_distributed import run
tokens = make_token_artifact(Path(sys.argv[1]) / os.environ["RANK"])  # every rank runs this script: own copies
run(tokens, Path(sys.argv[2]), "ntp", num_processes=2)
"""


def test_a_torchrun_launch_is_joined(single, tmp_path):
    """Under `torchrun --nproc_per_node 2`, train with num_processes=2 joins the launch instead of launching."""
    from tests.processes import lmpipe_env

    script = tmp_path / "joined.py"
    script.write_text(JOINED)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path / "tokens"), str(tmp_path / "work")], cwd=REPO, env=lmpipe_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching" not in done.stderr  # no launch of its own inside torchrun's
    assert_same_training(single / "ntp", tmp_path / "work")
