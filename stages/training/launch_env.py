"""Which node of a multi-node `lmpipe run` this process is, read from the environment its launcher set.

The same `lmpipe run` command is started once per node (torchrun --nproc-per-node 1, srun --ntasks-per-node 1, or
a job spec with one pod per node). The first source that names a node rank wins:

1. the `lmpipe run` flags --node-rank / --num-nodes / --rdzv-endpoint;
2. LMPIPE_NODE_RANK / LMPIPE_NUM_NODES / LMPIPE_RDZV_ENDPOINT;
3. torchrun (TORCHELASTIC_RUN_ID set): GROUP_RANK of GROUP_WORLD_SIZE; endpoint MASTER_ADDR:(MASTER_PORT + 1)
   (torchrun's own store holds MASTER_PORT);
4. SLURM (srun sets SLURM_PROCID and SLURM_NTASKS): SLURM_PROCID of SLURM_NTASKS, one task per node; endpoint
   MASTER_ADDR or the first host of SLURM_JOB_NODELIST, port MASTER_PORT or 29500;
5. a job spec: NODE_RANK (else RANK) of NNODES (else WORLD_SIZE); endpoint MASTER_ADDR:MASTER_PORT (29500).

A field the winning source lacks is taken from the next sources that have it (e.g. --node-rank with MASTER_ADDR
from the job spec). Nothing set: one node. `install` then writes the role as LMPIPE_* variables (what
`current()` reads, also in the processes a run starts) and removes torchrun's per-worker variables, so the
training stages launch their own workers instead of joining torchrun's group.
"""

import os
import re
from dataclasses import dataclass

DEFAULT_PORT = 29500
TORCHRUN_WORKER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                        "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                        "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


@dataclass(frozen=True)
class NodeRole:
    """This node's place in a run: its rank, the number of nodes, the run's rendezvous endpoint (host:port of
    node 0) and where these came from."""

    node_rank: int = 0
    num_nodes: int = 1
    endpoint: str | None = None
    source: str = "one node"

    @property
    def is_leader(self) -> bool:
        """Node 0 plans, takes the build locks, builds and publishes; the others join multi-node stages."""
        return self.node_rank == 0

    def host_port(self) -> tuple[str, int]:
        """The endpoint split into host and port."""
        host, _, port = (self.endpoint or "").rpartition(":")
        return host, int(port)

    def check(self) -> "NodeRole":
        """ValueError when the role is inconsistent (a rank out of range, several nodes without an endpoint)."""
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node rank {self.node_rank} of {self.num_nodes} node(s) ({self.source}): the rank must "
                             "be in 0..num_nodes-1")
        if self.num_nodes > 1 and not re.fullmatch(r".+:\d+", self.endpoint or ""):
            raise ValueError(f"{self.num_nodes} nodes ({self.source}) need a rendezvous endpoint host:port of node 0 "
                             "(--rdzv-endpoint, LMPIPE_RDZV_ENDPOINT or MASTER_ADDR); got "
                             f"{self.endpoint or 'none'}")
        return self


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list in its compressed form: `node[03-05,9],gpu1` -> `node03`."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = head.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _sources(env) -> list[tuple[str, dict]]:
    """Each launcher's (name, {node_rank, num_nodes, host, port}) in precedence order; a value it lacks is None."""
    get = env.get
    sources = [("LMPIPE_* variables", {"node_rank": get("LMPIPE_NODE_RANK"), "num_nodes": get("LMPIPE_NUM_NODES"),
                                       "endpoint": get("LMPIPE_RDZV_ENDPOINT")})]
    if get("TORCHELASTIC_RUN_ID"):
        if int(get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError("lmpipe run under torchrun needs --nproc-per-node 1 (one lmpipe run per node; it starts "
                             "train.num_processes workers per node itself)")
        port = get("MASTER_PORT")
        sources.append(("torchrun", {"node_rank": get("GROUP_RANK"), "num_nodes": get("GROUP_WORLD_SIZE"),
                                     "host": get("MASTER_ADDR"), "port": int(port) + 1 if port else None}))
    if get("SLURM_PROCID") and get("SLURM_NTASKS"):
        if int(get("SLURM_LOCALID", "0")) > 0:
            raise ValueError("lmpipe run under srun needs one task per node (srun --ntasks-per-node=1); it starts "
                             "train.num_processes workers per node itself")
        nodelist = get("SLURM_JOB_NODELIST") or get("SLURM_NODELIST")
        sources.append(("SLURM", {"node_rank": get("SLURM_PROCID"), "num_nodes": get("SLURM_NTASKS"),
                                  "host": get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None),
                                  "port": get("MASTER_PORT") or DEFAULT_PORT}))
    sources.append(("job spec (NODE_RANK/RANK, NNODES/WORLD_SIZE, MASTER_ADDR)",
                    {"node_rank": get("NODE_RANK") or get("RANK"), "num_nodes": get("NNODES") or get("WORLD_SIZE"),
                     "host": get("MASTER_ADDR"), "port": get("MASTER_PORT") or DEFAULT_PORT}))
    for _, values in sources:
        if values.get("host"):
            values["endpoint"] = f"{values['host']}:{values['port']}"
    return sources


def from_environment(env=None, *, node_rank: int | None = None, num_nodes: int | None = None,
                     endpoint: str | None = None) -> NodeRole:
    """This node's role: the explicit values, then the launchers' variables in the order the module docstring
    gives; ValueError when they are inconsistent."""
    env = os.environ if env is None else env
    explicit = {"node_rank": node_rank, "num_nodes": num_nodes, "endpoint": endpoint}
    sources = [("--node-rank/--num-nodes/--rdzv-endpoint", explicit), *_sources(env)]
    named = [(name, values) for name, values in sources if values.get("node_rank") is not None]
    if not named:
        return NodeRole()
    name, _ = named[0]
    picked = {field: next((v[field] for _, v in sources if v.get(field) is not None), None)
              for field in ("node_rank", "num_nodes", "endpoint")}
    return NodeRole(int(picked["node_rank"]), int(picked["num_nodes"] or 1), picked["endpoint"], name).check()


def install(role: NodeRole) -> None:
    """Make `role` this process's (and its children's) node role: LMPIPE_* variables set, torchrun's per-worker
    variables removed (the training stages launch their own workers)."""
    for name in TORCHRUN_WORKER_VARS:
        os.environ.pop(name, None)
    os.environ.update(LMPIPE_NODE_RANK=str(role.node_rank), LMPIPE_NUM_NODES=str(role.num_nodes),
                      LMPIPE_RDZV_ENDPOINT=role.endpoint or "")


def current() -> NodeRole | None:
    """The node role `lmpipe run` installed in this process when the run spans several nodes, else None."""
    if int(os.environ.get("LMPIPE_NUM_NODES", "1")) <= 1:
        return None
    return NodeRole(int(os.environ["LMPIPE_NODE_RANK"]), int(os.environ["LMPIPE_NUM_NODES"]),
                    os.environ["LMPIPE_RDZV_ENDPOINT"], "lmpipe run")


def nodes_spanned(config) -> int:
    """How many nodes a node's build spans: its training run's train.num_nodes (1 for every other stage)."""
    train = getattr(config, "train", None)
    return int(getattr(train, "num_nodes", 1) or 1)
