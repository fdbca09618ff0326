"""How the nodes of a multi-node `lmpipe run` keep in step: node 0 serves a small key-value store (torch's
TCPStore) at the run's endpoint for as long as its run lasts; the other nodes connect to it.

- Node 0 announces every multi-node build it starts (`announce`: sequence number s, node name and key); the
  build's workers meet at port + s of the endpoint (static rendezvous: node rank = group rank, so node 0's first
  worker is global rank 0, the one that writes the artifact). Followers take the announcements in order and join
  (stages/run_follower.py), whatever order and concurrency node 0's task runner chose.
- Node 0 records how its run ended (`finish`); followers wait for that and exit with it.
- A follower polls the store every POLL_SECONDS: when node 0's process is gone the connection fails at once, so
  no follower waits on a dead run. A follower that cannot reach node 0 within JOIN_TIMEOUT gives up.
"""

import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from stages.training.launch_env import NodeRole, current, nodes_spanned

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
JOIN_TIMEOUT = timedelta(minutes=30)
"""How long a follower waits for node 0's store to answer (node 0 may start later)."""
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
"""How long the nodes of one build wait for each other at its rendezvous (the followers join within seconds of
the announcement; a node that never comes fails the build on the others after this)."""
_STORE = None
_RENDEZVOUS: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("lmpipe_rdzv", default=None)


class RunStore:
    """Node 0's store of a multi-node run, from either side."""

    def __init__(self, role: NodeRole, timeout: timedelta = JOIN_TIMEOUT):
        from torch.distributed import TCPStore

        host, port = role.host_port()
        self.role = role
        # multi_tenant: the stage launches of this process may open their own stores on other ports meanwhile
        self.store = TCPStore(host, port, is_master=role.is_leader, multi_tenant=True, wait_for_workers=False,
                              timeout=timeout)

    def stage_endpoint(self, seq: int) -> str:
        """Where the workers of the seq-th announced build meet."""
        host, port = self.role.host_port()
        return f"{host}:{port + seq}"

    def announce(self, name: str, key: str) -> int:
        """Node 0: tell the followers that the build of `name` starts; returns its sequence number."""
        seq = int(self.store.add("lmpipe/announced", 1))
        self.store.set(f"lmpipe/build/{seq}", f"{name} {key}")
        log.info("%s: multi-node build %d, the other nodes join at %s", name, seq, self.stage_endpoint(seq))
        return seq

    def next_build(self, seq: int, check: Callable[[], None] = lambda: None) -> tuple[str, str] | None:
        """Follower: (name, key) of the seq-th announced build once node 0 announces it, or None when node 0's
        run ended first. RuntimeError when node 0 is gone; `check()` runs at every poll (it may raise)."""
        while True:
            check()
            try:
                if self.store.check([f"lmpipe/build/{seq}"]):
                    name, key = self.store.get(f"lmpipe/build/{seq}").decode().split()
                    return name, key
                if self.store.check(["lmpipe/end"]):
                    return None
            except Exception as err:  # noqa: BLE001 - torch raises DistNetworkError/DistStoreError/RuntimeError
                raise RuntimeError(f"node 0's lmpipe run is gone ({type(err).__name__}); this node stops") from None
            time.sleep(POLL_SECONDS)

    def finish(self, outcome: str, wait_s: float = 5.0) -> None:
        """Node 0: record how the run ended ("ok" or the error) and wait (up to wait_s) for every follower to
        read it before the store goes away with this process."""
        self.store.set("lmpipe/end", outcome)
        keys = [f"lmpipe/left/{rank}" for rank in range(1, self.role.num_nodes)]
        try:
            self.store.wait(keys, timedelta(seconds=wait_s))
        except Exception:  # noqa: BLE001 - a follower that died already does not hold up node 0's exit
            log.warning("not every node confirmed the end of the run within %.0f s", wait_s)

    def outcome(self) -> str:
        """Follower: node 0's outcome, confirming that this node read it."""
        outcome = self.store.get("lmpipe/end").decode()
        self.store.set(f"lmpipe/left/{self.role.node_rank}", "1")
        return outcome


@contextmanager
def serving(role: NodeRole) -> Iterator[RunStore]:
    """Node 0: the run's store for the duration of the block (announcements from any build thread reach it)."""
    global _STORE
    _STORE = RunStore(role)
    try:
        yield _STORE
    finally:
        _STORE = None


@contextmanager
def stage_rendezvous(endpoint: str, node_rank: int) -> Iterator[None]:
    """The block's training launches meet at `endpoint` as node `node_rank` (this thread only)."""
    token = _RENDEZVOUS.set((endpoint, node_rank))
    try:
        yield
    finally:
        _RENDEZVOUS.reset(token)


def rendezvous() -> tuple[str, int] | None:
    """(endpoint, node rank) of the multi-node build this thread runs, or None."""
    return _RENDEZVOUS.get()


@contextmanager
def multi_node_build(name: str, key: str, config) -> Iterator[None]:
    """Around node 0's build of a node: when the build spans several nodes of a multi-node run, announce it to
    the followers and point its training launch at the build's endpoint; otherwise nothing."""
    role = current()
    if role is None or nodes_spanned(config) == 1:
        yield
        return
    if _STORE is None:
        raise RuntimeError(f"{name} spans {nodes_spanned(config)} nodes, but this process serves no multi-node run "
                           "(multi-node builds run in `lmpipe run`'s own process: use the thread task runner)")
    with stage_rendezvous(_STORE.stage_endpoint(_STORE.announce(name, key)), role.node_rank):
        yield
