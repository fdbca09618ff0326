"""Training on several processes with torch.distributed (the train loop's only link to it).

- Launch: `launch` starts train.num_processes workers per node with torch's elastic launcher (the machinery
  `torchrun` uses; c10d rendezvous at train.rdzv_endpoint, or a free local port on one node). A process that is
  already a worker of a launch (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK) joins it instead (`launched`).
- Process group: NCCL on CUDA (one GPU per local rank), gloo on CPU.
- Model: `wrap` applies PyTorch's composable data parallelism per transformer block and then to the root:
  `replicate` (ddp: parameters replicated, gradients all-reduced) or FSDP2 `fully_shard` (fsdp: parameters,
  gradients and optimizer state sharded; bf16 parameters with fp32 gradient reduction on CUDA). The objectives
  call model methods other than forward (trunk, head, logits, features), so those are registered as FSDP forward
  methods; this is also what lets the multi-token objective's sequential per-head backward run unchanged.
- Reductions across ranks: `Ranks.mean` (losses and metrics), `Ranks.sum_state` (additive objective state).
"""

import contextlib
import contextvars
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.training import node_sync

log = logging.getLogger(__name__)

FORWARD_METHODS = ("trunk", "head", "logits", "features", "forward_heads", "residual_after", "loss_from")
"""GPT methods the objectives and the evaluation call directly (FSDP unshards parameters around each)."""

TIMEOUT = timedelta(minutes=30)
"""Collective timeout: a rank that died (kill -9) makes the others fail after this at the latest (the elastic
agent usually stops them within seconds when it sees the dead worker)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group (rank 0 writes files and logs)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_writer(self) -> bool:
        """Rank 0: the one process that writes artifacts, checkpoints' run state and progress lines."""
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of each value (same keys on every rank)."""
        if not values:
            return {}
        names = sorted(values)
        tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(tensor)
        return {n: float(v) / self.world_size for n, v in zip(names, tensor.tolist(), strict=True)}

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place (CPU tensors via gloo; returns the tensor)."""
        dist.all_reduce(tensor)
        return tensor

    def sum_state(self, state):
        """An additive state (nested dicts of tensors and numbers, e.g. an objective's counters) summed over ranks;
        1-D tensors of different lengths (counters that grew on one rank only) are zero-padded to the longest."""
        if isinstance(state, dict):
            return {key: self.sum_state(value) for key, value in sorted(state.items())}
        if isinstance(state, torch.Tensor):
            length = self.max_int(state.shape[0]) if state.ndim else 0
            padded = state if not state.ndim or state.shape[0] == length else torch.cat(
                [state, state.new_zeros((length - state.shape[0], *state.shape[1:]))])
            return self.sum_(padded.clone())
        if isinstance(state, (int, float)):
            return type(state)(self.sum_(torch.tensor([float(state)], dtype=torch.float64)).item())
        raise TypeError(f"objective state of type {type(state).__name__} cannot be summed over ranks")

    def max_int(self, value: int) -> int:
        """The largest `value` over ranks."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()


def current() -> Ranks | None:
    """This process's Ranks when a process group of several ranks is running, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return None


def launched() -> bool:
    """Is this process a worker of a torchrun / elastic launch (its environment names rank and world size)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def init_process_group(device_type: str) -> Ranks:
    """Join the launch's process group (NCCL on CUDA, gloo on CPU); sets this rank's CUDA device."""
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    ranks = current()
    assert ranks is not None, "init_process_group: a single-process group"
    return ranks


@contextlib.contextmanager
def worker_group(device_setting: str) -> Iterator[Ranks]:
    """In a spawned worker of `launch`: die with the launching process, hear stop signals, join the group (left
    at the end unless a torchrun script had made it) and log like the launching process (configure_worker)."""
    interrupt.die_with_parent()  # the launching process is gone: nobody waits for this rank any more
    interrupt.install_handlers()
    owns_group = not dist.is_initialized()  # a torchrun script may have made it already
    device = resolve_device(device_setting)
    ranks = init_process_group(device.type)
    configure_worker(ranks, device)
    try:
        yield ranks
    finally:
        if owns_group:
            dist.destroy_process_group()


def configure_worker(ranks: Ranks, device: torch.device) -> None:
    """A spawned worker: rank 0 logs progress like the parent process, the others only warnings; on the CPU the
    node's cores are split between its processes (torch would give each of them every core)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    logging.basicConfig(level=logging.INFO if ranks.is_writer else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s [rank {ranks.rank}]: %(message)s",
                        datefmt="%H:%M:%S")
    # The model's methods return views (e.g. a slice of the stream); nothing edits them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """This rank's device: cuda:<local rank> on CUDA, the CPU otherwise."""
    return torch.device("cuda", ranks.local_rank) if device.type == "cuda" else device


def launch(worker: Callable, args: tuple, cfg, run_id: str, stop_file: Path) -> object:
    """Run worker(*args) in cfg.num_processes processes on this node (times cfg.num_nodes nodes, if it has that
    field: a TrainConfig) with torch's elastic launcher; returns the value of this node's lowest rank.

    Where the nodes meet: inside a multi-node `lmpipe run` (node_sync.rendezvous set), at the build's endpoint
    with a static rendezvous whose group rank is the node rank, so node 0 holds global rank 0 (the writer);
    otherwise at cfg.rdzv_endpoint with torch's c10d rendezvous (ranks in arrival order), or a free local port.
    A stop signal to this process (interrupt.STOP) is passed on by creating `stop_file`, which the workers check
    at every step boundary (they save a checkpoint and stop together); the launch then raises Interrupted. A
    failed worker raises torch's ChildFailedError, which names the rank and its error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    num_nodes = getattr(cfg, "num_nodes", 1)
    joined = node_sync.rendezvous() if num_nodes > 1 else None
    if joined is not None:
        endpoint, backend = joined[0], "static"
        rdzv_configs = {"rank": joined[1], "timeout": int(node_sync.RENDEZVOUS_TIMEOUT.total_seconds())}
    elif num_nodes > 1 and not getattr(cfg, "rdzv_endpoint", None):
        raise ValueError(f"{run_id}: train.num_nodes={num_nodes} needs the nodes' meeting point: run it with "
                         "`lmpipe run` on every node (docs/operations.md, Past one node) or set train.rdzv_endpoint")
    else:
        endpoint, backend, rdzv_configs = getattr(cfg, "rdzv_endpoint", None) or f"localhost:{free_port()}", "c10d", {}
    run_id = "lmpipe-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id)  # also names the launcher's log folder
    config = LaunchConfig(min_nodes=num_nodes, max_nodes=num_nodes, nproc_per_node=cfg.num_processes,
                          rdzv_backend=backend, rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs, run_id=run_id,
                          max_restarts=0, monitor_interval=0.5, start_method="spawn")
    log.info("%s: launching %d process(es) per node on %d node(s), rendezvous %s", run_id, cfg.num_processes,
             num_nodes, endpoint)
    stop_file.unlink(missing_ok=True)
    done = threading.Event()
    watched = contextvars.copy_context()  # the task run's stop file (interrupt.watching) goes with the thread
    forwarder = threading.Thread(target=watched.run, args=(_forward_stop, stop_file, done), daemon=True)
    forwarder.start()
    try:
        results = elastic_launch(config, worker)(*args)
    except ChildFailedError:
        if interrupt.requested():
            raise interrupt.Interrupted(f"stopped by a signal: {run_id}'s workers saved a checkpoint; run the same "
                                        "command again to resume from it") from None
        raise
    finally:
        done.set()
        forwarder.join()  # it asks interrupt.requested() no more once the launch is over
        stop_file.unlink(missing_ok=True)
    return results[min(results)]


def _forward_stop(stop_file: Path, done: threading.Event) -> None:
    while not done.wait(0.2):
        if interrupt.STOP.is_set() or interrupt.requested():
            stop_file.touch()
            return


def stop_requested(ranks: Ranks, stop_file: Path) -> bool:
    """Did any rank get a stop signal, or the launching process (stop_file)? The same answer on every rank."""
    return ranks.max_int(int(interrupt.requested() or stop_file.exists())) > 0


def free_port() -> int:
    """A TCP port nothing listens on right now (for a local rendezvous)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wrap(model: nn.Module, parallelism: str, device: torch.device) -> nn.Module:
    """Apply replicate (ddp) or fully_shard (fsdp) to every repeated block, then to the model; in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if parallelism == "fsdp":
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if device.type == "cuda" else MixedPrecisionPolicy())
        apply = lambda module: fully_shard(module, mp_policy=policy)  # noqa: E731
    else:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        apply = replicate
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                apply(block)
    apply(model)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients after this backward (the step's last micro-batch) or keep accumulating locally."""
    model.set_requires_gradient_sync(sync)


def full_grad_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor over sharded or replicated gradients)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
