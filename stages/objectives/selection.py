"""Token selection for Selective Language Modeling (Rho-1, arXiv 2404.07965, eqs. 3-5).

Pure functions on (B, T) tensors; nothing is written. A score is "higher = keep":
- `excess_loss`: L_target - L_ref (signed, Rho-1 eq. 3), from the DETACHED target loss, in fp32;
- `reference_loss`: -L_ref (keeps the tokens the reference model finds easiest);
- `reference_entropy`: -H_ref (keeps the positions where the reference model is most certain);
- `reference_loss_and_entropy`: the INTERSECTION of the `reference_loss` and `reference_entropy` top-k masks
  (Rho-1 App. H). It keeps between max(0, 2k - N) and k tokens, so the loss is normalised by the number
  actually kept, not by k.
The top k% is taken over all valid tokens of a pool ranked together, never per sequence; padding / ignored
targets are never selected. The pool is the micro-batch (`top_k_mask`, `select_tokens`; SelectionConfig
rank_over="micro_batch") or, as the paper ranks per batch, every micro-batch of the optimiser step
(`select_tokens_pooled`; rank_over="step"): then the k kept tokens are spread unevenly over the micro-batches.
"""

from collections.abc import Sequence

import numpy as np
import torch

SCORE_KINDS = ("excess_loss", "reference_loss", "reference_entropy", "reference_loss_and_entropy")


def num_to_keep(num_valid: int, keep_ratio: float) -> int:
    """k = max(1, round(keep_ratio * num_valid)), and 0 when there is no valid token."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio={keep_ratio} must be in (0, 1]")
    return 0 if num_valid == 0 else min(num_valid, max(1, round(keep_ratio * num_valid)))


def selection_scores(kind: str, token_loss_BT: torch.Tensor | None, ref_loss_BT: torch.Tensor | None,
                     ref_entropy_BT: torch.Tensor | None) -> torch.Tensor:
    """fp32 score per target (higher = keep) for one of the single-score kinds."""
    if kind == "excess_loss":
        if token_loss_BT is None or ref_loss_BT is None:
            raise ValueError("score excess_loss needs the target's token loss and the reference loss")
        return token_loss_BT.detach().float() - ref_loss_BT.float()
    if kind == "reference_loss":
        if ref_loss_BT is None:
            raise ValueError("score reference_loss needs the reference loss (score_reference upstream)")
        return -ref_loss_BT.float()
    if kind == "reference_entropy":
        if ref_entropy_BT is None:
            raise ValueError("score reference_entropy needs the reference entropy (score_reference upstream)")
        return -ref_entropy_BT.float()
    if kind == "reference_loss_and_entropy":
        raise ValueError("reference_loss_and_entropy is an intersection of two masks: use select_tokens()")
    raise ValueError(f"unknown selection score {kind!r}; expected one of {SCORE_KINDS}")


def top_k_mask(score_BT: torch.Tensor, valid_BT: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Bool mask of exactly k valid positions with the highest scores, ranked over the whole (B, T) pool."""
    if score_BT.shape != valid_BT.shape:
        raise ValueError(f"score shape {tuple(score_BT.shape)} != valid shape {tuple(valid_BT.shape)}")
    k = num_to_keep(int(valid_BT.sum()), keep_ratio)
    mask_N = torch.zeros(valid_BT.numel(), dtype=torch.bool, device=valid_BT.device)
    if k:
        # invalid positions get -inf: with k <= #valid they are never among the top k. NaN scores (which
        # topk would rank first) rank last too; train_target rejects non-finite reference scores up front.
        ranked_N = score_BT.float().masked_fill(~valid_BT | score_BT.isnan(), float("-inf")).reshape(-1)
        mask_N[ranked_N.topk(k).indices] = True
    return mask_N.view(valid_BT.shape)


def select_tokens(kind: str, keep_ratio: float, valid_BT: torch.Tensor, token_loss_BT: torch.Tensor | None,
                  ref_loss_BT: torch.Tensor | None, ref_entropy_BT: torch.Tensor | None) -> torch.Tensor:
    """Selection mask for a score kind (the intersection of two top-k masks for reference_loss_and_entropy)."""
    if kind == "reference_loss_and_entropy":
        by_loss_BT = top_k_mask(selection_scores("reference_loss", None, ref_loss_BT, None), valid_BT, keep_ratio)
        by_entropy_BT = top_k_mask(selection_scores("reference_entropy", None, None, ref_entropy_BT),
                                   valid_BT, keep_ratio)
        return by_loss_BT & by_entropy_BT
    score_BT = selection_scores(kind, token_loss_BT, ref_loss_BT, ref_entropy_BT)
    return top_k_mask(score_BT, valid_BT, keep_ratio)


def select_tokens_pooled(kind: str, keep_ratio: float, valid_BTs: Sequence[torch.Tensor],
                         token_loss_BTs: Sequence[torch.Tensor] | None, ref_loss_BTs: Sequence[torch.Tensor] | None,
                         ref_entropy_BTs: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """select_tokens over several micro-batches ranked as ONE pool (the optimiser step): exactly
    k = num_to_keep(total valid, keep_ratio) kept over all of them (at most k for the intersection kind).

    Every argument is a list with one (B, T) tensor per micro-batch (or None, as select_tokens allows); returns
    one bool mask per micro-batch, shaped like its valid mask."""
    def pooled_1N(parts_BT: Sequence[torch.Tensor] | None) -> torch.Tensor | None:
        return None if parts_BT is None else torch.cat([part_BT.reshape(-1) for part_BT in parts_BT]).unsqueeze(0)

    mask_1N = select_tokens(kind, keep_ratio, pooled_1N(valid_BTs), pooled_1N(token_loss_BTs),
                            pooled_1N(ref_loss_BTs), pooled_1N(ref_entropy_BTs))
    masks_N = mask_1N[0].split([valid_BT.numel() for valid_BT in valid_BTs])
    return [mask_N.view(valid_BT.shape) for mask_N, valid_BT in zip(masks_N, valid_BTs, strict=True)]


class SelectionCounter:
    """Per training token: times it was in a batch and times it was selected (CPU int32 counters).

    Written as token_selection.parquet (schemas.tables.TOKEN_SELECTION), which answers "which tokens does SLM
    never select"."""

    def __init__(self):
        self.seen_N: torch.Tensor | None = None
        self.selected_N: torch.Tensor | None = None

    def add(self, token_index_BT: torch.Tensor, selected_BT: torch.Tensor) -> None:
        """Count one micro-batch."""
        index_N = token_index_BT.flatten().cpu()
        needed = int(index_N.max()) + 1 if len(index_N) else 0
        if self.seen_N is None or len(self.seen_N) < needed:
            self._grow(max(needed, 2 * len(self.seen_N) if self.seen_N is not None else needed))
        self.seen_N.index_add_(0, index_N, torch.ones_like(index_N, dtype=torch.int32))
        self.selected_N.index_add_(0, index_N, selected_BT.flatten().cpu().to(torch.int32))

    def _grow(self, size: int) -> None:
        seen, selected = torch.zeros(size, dtype=torch.int32), torch.zeros(size, dtype=torch.int32)
        if self.seen_N is not None:
            seen[: len(self.seen_N)], selected[: len(self.selected_N)] = self.seen_N, self.selected_N
        self.seen_N, self.selected_N = seen, selected

    def state_dict(self) -> dict:
        """The counters (tensors) for checkpoints."""
        return {} if self.seen_N is None else {"seen": self.seen_N, "selected": self.selected_N}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by state_dict()."""
        if state:
            self.seen_N, self.selected_N = state["seen"].clone(), state["selected"].clone()

    def table(self, split: str) -> dict:
        """Columns of token_selection.parquet (tokens seen at least once)."""
        seen_N = self.seen_N.numpy() if self.seen_N is not None else np.zeros(0, np.int32)
        selected_N = self.selected_N.numpy() if self.selected_N is not None else np.zeros(0, np.int32)
        token_index = np.flatnonzero(seen_N)
        return {"split": [split] * len(token_index), "token_index": token_index,
                "times_seen": seen_N[token_index], "times_selected": selected_N[token_index]}
