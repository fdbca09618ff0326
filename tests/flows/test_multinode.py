"""Two "nodes" on this machine: two `lmpipe run` processes with node ranks 0 and 1, one artifact root (a shared
file system), `--only train_reference` with reference.train.num_nodes=2 (gloo). Node 0 builds through Prefect,
node 1 joins the training's process group; the reference equals a one-node build's to float tolerance. Killing
node 1 mid-stage ends both runs within a bounded time with the checkpoint intact, and the re-run resumes from it."""

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

from schemas.loading import load_config
from stages.dag import plan
from stages.node_builder import build_node
from storage.artifacts import build_dir, read_manifest
from storage.checkpoints import list_checkpoints
from tests.processes import REPO, free_port, lmpipe_env

pytestmark = pytest.mark.multiprocess

TOLERANCE = dict(rtol=1e-4, atol=1e-5)
SHARED = ["reference.train.micro_batch_size=4"]  # 2 micro-batches per step: one per node
TWO_NODES = [*SHARED, "reference.train.num_nodes=2"]


def reference_node(overrides: list[str]):
    return plan(load_config("tiny", None, overrides))["train_reference"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An artifact root with the tiny preset's tokens and its one-node reference (built in this process)."""
    root = tmp_path_factory.mktemp("shared")
    nodes = plan(load_config("tiny", None, SHARED))
    tokens = build_node(nodes["tokenize_corpus"], {}, root=root)
    build_node(nodes["train_reference"], {"tokens": tokens}, root=root)
    return root


def start_nodes(root: Path, overrides: list[str], log_dir: Path) -> list[subprocess.Popen]:
    endpoint = f"localhost:{free_port()}"
    command = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--only", "train_reference",
               *[arg for o in overrides for arg in ("--set", o)], "--num-nodes", "2", "--rdzv-endpoint", endpoint]
    log_dir.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([*command, "--node-rank", str(rank)], cwd=REPO, env=lmpipe_env(root),
                             stdout=open(log_dir / f"node{rank}.log", "wb"), stderr=subprocess.STDOUT)
            for rank in range(2)]


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(log_dir.glob("*.log")))


@pytest.mark.timeout(600)
def test_two_nodes_build_what_one_builds(root, tmp_path):
    nodes = start_nodes(root, TWO_NODES, tmp_path)
    codes = [node.wait(timeout=280) for node in nodes]
    assert codes == [0, 0], logs(tmp_path)
    assert "joined 1 build(s): train_reference" in (tmp_path / "node1.log").read_text()
    one, two = (Path(read_manifest("train_reference", reference_node(o).key, root).path) for o in (SHARED, TWO_NODES))
    for name, tensor in load_file(one / "model.safetensors").items():
        torch.testing.assert_close(load_file(two / "model.safetensors")[name], tensor, **TOLERANCE)
    rows = [{(r["step"], r["name"]): r["value"] for r in pq.read_table(d / "metrics.parquet").to_pylist()
             if r["name"] != "train/tokens_per_s"} for d in (one, two)]
    assert rows[0].keys() == rows[1].keys()
    np.testing.assert_allclose([rows[1][k] for k in sorted(rows[0])], [rows[0][k] for k in sorted(rows[0])],
                               **TOLERANCE)


@pytest.mark.timeout(600)  # two runs of both nodes, each with Prefect's start-up
def test_killing_node_1_mid_stage_ends_both_and_the_rerun_resumes(root, tmp_path):
    overrides = [*TWO_NODES, "reference.train.max_tokens=30720", "reference.train.checkpoint_every_steps=3"]
    node = reference_node(overrides)
    checkpoints = build_dir(node.stage, node.key, root) / "checkpoints"
    leader, follower = start_nodes(root, overrides, tmp_path / "first")
    deadline = time.monotonic() + 240
    while not list_checkpoints(checkpoints) and leader.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list_checkpoints(checkpoints), logs(tmp_path / "first")
    os.kill(follower.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert leader.wait(timeout=120) != 0
    assert time.monotonic() - killed < 120
    saved = [step for step, _ in list_checkpoints(checkpoints)]
    assert saved and not (checkpoints.parent / "model.safetensors").exists()
    nodes = start_nodes(root, overrides, tmp_path / "again")
    assert [n.wait(timeout=280) for n in nodes] == [0, 0], logs(tmp_path / "again")
    summary = read_manifest("train_reference", node.key, root).summary
    assert summary["resumed_from_step"] >= saved[0] > 0
