"""train_sae on several processes: data parallel over the activation rows of each step.

Every process holds the whole SAE and its Adam state. A step's windows (the same on every rank: one data order)
are split into equal contiguous shares; each rank runs the reference forward and the SAE on its share, and the
ranks agree so exactly that N processes train the SAE one trains, to float tolerance (the global batch is split,
not multiplied; sae.num_processes is not a change of recipe):

- the FVU and AuxK denominators (the batch's centred sum of squares of the input and of the residual) are the
  global batch's, from summed moments, so the ranks' losses add up to the one-process loss, and gradients are
  summed over ranks before the parallel-component removal and Adam: every rank then takes the same step, and the
  decoder renormalisation that follows gives the same unit rows everywhere;
- the pre-bias starts at the geometric median of the whole first batch (gathered);
- the dead-latent counters advance by the global rows and reset for the latents that fired on any rank;
- metrics are the global batch's; rank 0 evaluates, checkpoints and writes the artifact; the stop decision is
  taken together (any rank's signal, or the launching process's stop file).

`OneProcess` is the plain loop's behaviour (the stage's numbers on one process are unchanged).
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stages.models.sae import DeadLatentTracker, SAEOutput, TopKSAE, sae_loss
from stages.runtime import interrupt
from stages.training import distributed


class OneProcess:
    """The SAE loop on one process: every hook is the plain step."""

    is_writer = True

    def share(self, window_ids: np.ndarray) -> np.ndarray:
        """This rank's windows of the step."""
        return window_ids

    def gather_rows(self, rows_ND: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of the step, in window order."""
        return rows_ND

    def rows(self, local_rows: int) -> int:
        """The step's rows over all ranks."""
        return local_rows

    def loss(self, sae: TopKSAE, xn_ND: torch.Tensor, dead_L: torch.Tensor, aux_k: int, aux_coef: float,
             out: SAEOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to back-propagate on this rank and the step's metrics (stages/models/sae.sae_loss)."""
        return sae_loss(sae, xn_ND, dead_L, aux_k, aux_coef, out=out)

    def sync_grads(self, sae: TopKSAE) -> None:
        """Sum the gradients over ranks (after backward, before the step)."""

    def track(self, tracker: DeadLatentTracker, out: SAEOutput, local_rows: int) -> None:
        """Advance the dead-latent counters by the step."""
        tracker.update(out.idx_NK.detach(), out.vals_NK.detach(), local_rows)

    def stop_requested(self) -> bool:
        """Stop after this step (with a checkpoint)?"""
        return interrupt.requested()

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote a checkpoint)."""


class RowShards(OneProcess):
    """The SAE loop as one of several processes (a launched worker)."""

    def __init__(self, ranks: distributed.Ranks, stop_file: Path):
        self.ranks, self.stop_file, self.is_writer = ranks, stop_file, ranks.is_writer

    def share(self, window_ids: np.ndarray) -> np.ndarray:
        if len(window_ids) % self.ranks.world_size:
            raise ValueError(f"train_sae: {len(window_ids)} windows per step cannot be shared evenly by "
                             f"{self.ranks.world_size} processes; make sae.batch_rows / tokenize.seq_len a multiple "
                             "of sae.num_processes")
        return np.array_split(window_ids, self.ranks.world_size)[self.ranks.rank]

    def gather_rows(self, rows_ND: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows_ND) for _ in range(self.ranks.world_size)]
        dist.all_gather(parts, rows_ND.contiguous())
        return torch.cat(parts)

    def rows(self, local_rows: int) -> int:
        return local_rows * self.ranks.world_size  # equal shares

    def loss(self, sae, xn_ND, dead_L, aux_k, aux_coef, out):
        # sae_loss divides by this rank's denominators; rescaling its two terms by (local / global denominator)
        # makes the ranks' losses sum to the global batch's (the denominators hold no parameter: inputs only)
        err_ND = (xn_ND - out.xhat_ND).detach()
        local = torch.stack([_centred_sum_sq(xn_ND), _centred_sum_sq(err_ND)])
        fvu_scale, aux_scale = (local / torch.stack([self._global_centred_sum_sq(x) for x in (xn_ND, err_ND)]))
        loss, stats = sae_loss(sae, xn_ND, dead_L, aux_k, aux_coef * float(aux_scale / fvu_scale), out=out)
        n = xn_ND.shape[0]
        summed = self.ranks.sum_(torch.stack([stats["fvu"] * fvu_scale, stats["aux_loss"] * aux_scale,
                                              stats["l0"] * n]).double())
        stats = stats | {"fvu": summed[0].float(), "aux_loss": summed[1].float(),
                         "l0": (summed[2] / self.rows(n)).float()}
        return loss * fvu_scale.to(loss.dtype), stats

    def _global_centred_sum_sq(self, x_ND: torch.Tensor) -> torch.Tensor:
        """sum over every rank's rows of |x - global mean|^2, from summed moments (float64)."""
        x = x_ND.detach().double()
        moments = self.ranks.sum_(torch.cat([x.sum(0), x.pow(2).sum().view(1), x.new_tensor([x.shape[0]])]))
        total_D, total_sq, count = moments[:-2], moments[-2], moments[-1]
        return (total_sq - total_D.pow(2).sum() / count).clamp_min(1e-12).to(x_ND.dtype)

    def sync_grads(self, sae):
        for param in sae.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            self.ranks.sum_(param.grad)

    def track(self, tracker, out, local_rows):
        fired_L = torch.zeros(tracker.tokens_since_fired_L.shape, dtype=torch.int32, device=out.idx_NK.device)
        fired_L[out.idx_NK[out.vals_NK > tracker.fire_threshold]] = 1
        dist.all_reduce(fired_L, op=dist.ReduceOp.MAX)
        # the latents that fired on any rank, as one active value each: the tracker's own update does the rest
        idx_M1 = fired_L.nonzero()
        tracker.update(idx_M1, torch.full(idx_M1.shape, 2 * tracker.fire_threshold + 1.0, device=idx_M1.device),
                       self.rows(local_rows))

    def stop_requested(self):
        return distributed.stop_requested(self.ranks, self.stop_file)

    def barrier(self):
        self.ranks.barrier()


def _centred_sum_sq(x_ND: torch.Tensor) -> torch.Tensor:
    """sum |x - mean|^2 over the rows, as sae_loss computes its denominators."""
    return (x_ND - x_ND.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def run(train, cfg, inputs: dict, out: Path) -> dict:
    """train(cfg, inputs, out, hooks) on cfg.num_processes processes of this node: with OneProcess in this
    process, or launched (torch's elastic launcher, stages/training/distributed.py) with RowShards in each worker;
    returns rank 0's summary. A process that already is a worker of a launch of that size joins it."""
    if cfg.num_processes == 1:
        return train(cfg, inputs, out, OneProcess())
    stop_file = Path(out) / ".stop"
    if distributed.launched() and int(os.environ["WORLD_SIZE"]) == cfg.num_processes:
        return _worker(train, cfg, inputs, out, stop_file)
    return distributed.launch(_worker, (train, cfg, inputs, out, stop_file), cfg, run_id="train_sae",
                              stop_file=stop_file)


def _worker(train, cfg, inputs: dict, out: Path, stop_file: Path) -> dict:
    with distributed.worker_group(cfg.device) as ranks:
        return train(cfg, inputs, out, RowShards(ranks, stop_file))
