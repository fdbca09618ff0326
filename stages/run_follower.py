"""A follower node of a multi-node `lmpipe run` (node rank > 0): it builds nothing itself and takes no lock.

Every node computes the same plan from the same config. Node 0 builds as on one node and announces each build
that spans several nodes (stages/training/node_sync.py); the follower takes the announcements in order, checks
that its own plan has that node with the same key, and, when its rank is below the build's train.num_nodes,
runs the stage in a thread with its training launch joining node 0's (the same work folder, which the shared
artifact root makes one: every rank writes its checkpoint shards there, rank 0 on node 0 writes the artifact's
files). Single-node stages are node 0's alone. The follower ends with node 0's run: successfully when node 0's
run did, with an error when it failed, when a joined build failed here, or at once when node 0's process is gone.
Prefect-free.
"""

import logging
import threading

from stages.registry import stage
from stages.run_plan import RunPlan
from stages.training.launch_env import NodeRole, nodes_spanned
from stages.training.node_sync import RunStore, stage_rendezvous
from storage.artifacts import build_dir, open_artifact

log = logging.getLogger(__name__)


class _Joined(threading.Thread):
    """One build this node takes part in: the stage's run() with its launch pointed at node 0's."""

    def __init__(self, run: RunPlan, name: str, endpoint: str, node_rank: int):
        super().__init__(name=f"join-{name}", daemon=True)
        self.run_plan, self.node_name, self.endpoint, self.node_rank = run, name, endpoint, node_rank
        self.error: BaseException | None = None

    def run(self) -> None:
        nodes, node = self.run_plan.nodes, self.run_plan.nodes[self.node_name]
        try:
            work = build_dir(node.stage, node.key)
            if not work.is_dir():
                raise ValueError(f"node 0 builds {node.name} in {work}, which this node does not see: every node "
                                 "needs the same LMPIPE_ROOT on a file system they share")
            inputs = {role: open_artifact(nodes[up].stage, nodes[up].key) for role, up in node.upstream.items()}
            log.info("%s: joining node 0's build at %s as node %d", node.name, self.endpoint, self.node_rank)
            with stage_rendezvous(self.endpoint, self.node_rank):
                stage(node.stage).run(node.config, inputs, work)
        except BaseException as err:  # noqa: BLE001 - reported by follow() in the main thread
            self.error = err


def follow(run: RunPlan, role: NodeRole) -> list[str]:
    """Take part in node 0's run until it ends; returns the names of the builds this node joined. RuntimeError
    when node 0's run failed or is gone, or a joined build failed here (its own error)."""
    store = RunStore(role)
    log.info("node %d of %d: following node 0 at %s", role.node_rank, role.num_nodes, role.endpoint)
    joined: list[_Joined] = []
    seq = 0
    while (announced := store.next_build(seq + 1, _first_error(joined))) is not None:
        seq += 1
        name, key = announced
        node = run.nodes.get(name)
        if node is None or node.key != key:
            mine = "no such node" if node is None else f"key {node.key}"
            raise ValueError(f"node 0 builds {name} with key {key}, this node's plan has {mine}: start every node "
                             "with the same command, config and code")
        if role.node_rank < nodes_spanned(node.config):
            joined.append(_Joined(run, name, store.stage_endpoint(seq), role.node_rank))
            joined[-1].start()
    outcome = store.outcome()
    for thread in joined:
        thread.join()
    _first_error(joined)()
    if outcome != "ok":
        raise RuntimeError(f"node 0's run failed: {outcome}")
    return [thread.node_name for thread in joined]


def _first_error(joined: list[_Joined]):
    """A check that raises the error of the first joined build that failed (a follower stops at once then)."""
    def check() -> None:
        for thread in joined:
            if thread.error is not None:
                raise RuntimeError(f"{thread.node_name} failed on this node: {thread.error}") from thread.error
    return check
