"""`lmpipe run` on several nodes: this node's role (stages/training/launch_env.py), node 0's run store around
its build, and the follower path of the other nodes (stages/run_follower.py). docs/operations.md, Past one node.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from stages.run_plan import RunPlan
from stages.training import launch_env, node_sync

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """The node flags of `lmpipe run` (each overrides the launcher's environment)."""
    parser.add_argument("--node-rank", type=int, metavar="N", help="this node's rank in a multi-node run (default: "
                        "from torchrun, srun or the job spec's NODE_RANK/RANK, else 0)")
    parser.add_argument("--num-nodes", type=int, metavar="N", help="nodes of a multi-node run (default: from the "
                        "launcher, else 1)")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a port: its run store; "
                        "multi-node builds meet at the ports after it (default: from the launcher's MASTER_ADDR)")


def node_role(args, run: RunPlan, task_runner: str | None) -> launch_env.NodeRole:
    """This node's role; for a multi-node run it is installed for the stages, after checking that the run can
    span nodes (ValueError otherwise, before anything starts)."""
    from storage.artifacts import object_store

    role = launch_env.from_environment(node_rank=args.node_rank, num_nodes=args.num_nodes,
                                       endpoint=args.rdzv_endpoint)
    if role.num_nodes == 1:
        return role
    if object_store() is not None:
        raise ValueError("a multi-node run needs LMPIPE_ROOT on a file system every node shares (the ranks of a "
                         "multi-node build write their checkpoint shards into one build folder), not a bucket")
    if task_runner not in (None, "thread"):
        raise ValueError(f"a multi-node run builds in `lmpipe run`'s own process: --task-runner {task_runner} "
                         "cannot be combined with several nodes")
    for name, node in run.nodes.items():
        if name in run.wanted and launch_env.nodes_spanned(node.config) > role.num_nodes:
            raise ValueError(f"{name} trains on train.num_nodes={launch_env.nodes_spanned(node.config)} nodes, "
                             f"but the run has {role.num_nodes}")
    launch_env.install(role)
    log.info("node %d of %d (%s), run endpoint %s", role.node_rank, role.num_nodes, role.source, role.endpoint)
    return role


@contextmanager
def leading(role: launch_env.NodeRole) -> Iterator[None]:
    """Node 0's build, with the run store serving the other nodes while it lasts; they learn how it ended."""
    if role.num_nodes == 1:
        yield
        return
    with node_sync.serving(role) as store:
        try:
            yield
        except BaseException as err:
            store.finish(f"{type(err).__name__}: {err}".replace("\n", " ")[:500])
            raise
        store.finish("ok")


def follow(run: RunPlan, role: launch_env.NodeRole) -> int:
    """A follower node: join node 0's multi-node builds until its run ends (stages/run_follower.py)."""
    from stages.run_follower import follow as follow_node
    from stages.runtime.interrupt import install_handlers

    install_handlers()  # a stop signal reaches the joined builds' workers through their stop files
    joined = follow_node(run, role)
    print(f"node {role.node_rank}: node 0's run is done; joined {len(joined)} build(s)"
          + (f": {', '.join(joined)}" if joined else ""))
    return 0
