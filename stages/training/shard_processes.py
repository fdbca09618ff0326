"""One shard of a per-window stage (reference scoring, concept extraction) on several processes of this node.

The shard's windows [start, stop) are cut into `num_processes` contiguous ranges in window order; rank r runs
`compute(lo, hi, device, rank_dir)` on range r and writes what it found under its own `rank_dir`; the launching
process then merges the ranks' outputs in rank order. A window's result does not depend on which process computed
it or on its batch neighbours (to float tolerance: a batch's kernels may reduce in another order), so the merged
shard is the one-process shard and `num_processes` is not a change of recipe.

Launched with stages.training.distributed.launch, as the trainer's and the SAE's workers are: one process per GPU
on CUDA (cuda:<local rank>), the node's cores split between the processes on the CPU. A stop signal to the
launching process reaches every rank through the launch's stop file (each `interrupt.check` in `compute` sees
it); a failed or stopped rank fails the shard, and nothing of it is kept.
"""

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.training import distributed

Compute = Callable[[int, int, torch.device, Path], None]
"""compute(lo, hi, device, rank_dir): process windows lo..hi-1 on `device`, writing into `rank_dir`."""


def window_ranges(start: int, stop: int, num_processes: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of windows start..stop-1, one per process, in window order, of near-equal size
    (some empty when there are fewer windows than processes)."""
    bounds = [start + rank * (stop - start) // num_processes for rank in range(num_processes + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def rank_dir(part_dir: Path, rank: int) -> Path:
    """Where rank `rank` writes its share of the shard."""
    return Path(part_dir) / f"rank-{rank:03d}"


def _worker(compute: Compute, start: int, stop: int, device_setting: str, part_dir: Path, stop_file: Path) -> None:
    """One launched process: its range of the shard, watching the launch's stop file."""
    with distributed.worker_group(device_setting) as ranks, interrupt.watching(str(stop_file)):
        lo, hi = window_ranges(start, stop, ranks.world_size)[ranks.rank]
        out = rank_dir(part_dir, ranks.rank)
        out.mkdir(parents=True, exist_ok=True)
        compute(lo, hi, distributed.device_for(ranks, resolve_device(device_setting)), out)


def run_shard(compute: Compute, start: int, stop: int, cfg, run_id: str, part_dir: Path) -> list[Path]:
    """Run `compute` over windows start..stop-1 on cfg.num_processes processes (cfg.device); returns the ranks'
    output folders in rank order. `part_dir` is emptied first and is the caller's to remove after merging."""
    part_dir = Path(part_dir)
    shutil.rmtree(part_dir, ignore_errors=True)
    part_dir.mkdir(parents=True)
    stop_file = part_dir / "stop"
    distributed.launch(_worker, (compute, start, stop, cfg.device, part_dir, stop_file), cfg, run_id, stop_file)
    return [rank_dir(part_dir, rank) for rank in range(cfg.num_processes)]
