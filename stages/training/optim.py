"""Optimiser and schedule: step arithmetic of a run, AdamW with two weight-decay groups, warmup + cosine LR."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from schemas.configs import TrainConfig


@dataclass(frozen=True)
class BatchSchedule:
    """Step arithmetic of a run, derived from the config and the window length."""

    total_steps: int
    accum_steps: int
    step_tokens: int

    @classmethod
    def of(cls, cfg: TrainConfig, seq_len: int) -> "BatchSchedule":
        """steps = ceil(max_tokens / batch_size_tokens); accumulation = batch / (micro_batch * seq_len), a multiple
        of the number of training processes."""
        micro_tokens = cfg.micro_batch_size * seq_len
        if cfg.batch_size_tokens % micro_tokens:
            raise ValueError(f"train.batch_size_tokens ({cfg.batch_size_tokens}) must be a multiple of "
                             f"micro_batch_size * seq_len = {micro_tokens}")
        accum_steps = cfg.batch_size_tokens // micro_tokens
        if accum_steps % cfg.world_size:  # every process takes the same number of each step's micro-batches
            raise ValueError(
                f"a step has {accum_steps} micro-batches (train.batch_size_tokens / (micro_batch_size * seq_len)), "
                f"which {cfg.world_size} processes cannot share evenly; make train.batch_size_tokens a multiple of "
                f"{cfg.world_size} * micro_batch_size * seq_len or lower train.micro_batch_size")
        return cls(math.ceil(cfg.max_tokens / cfg.batch_size_tokens), accum_steps, cfg.batch_size_tokens)

    def as_list(self) -> list[int]:
        """[total_steps, accum_steps, step_tokens] (what a checkpoint records)."""
        return [self.total_steps, self.accum_steps, self.step_tokens]


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """LR of the update after `step` completed steps: linear warmup to cfg.lr, cosine to lr*min_lr_ratio.

    Warmup steps 0..W-1 use lr*(step+1)/W; steps W..S-1 decay so that step W has the peak and the last
    step S-1 the minimum.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on every parameter with ndim >= 2 (matrices, embedding/unembedding
    included), none on vectors (norm gains, biases). Tied weights appear once."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the two weight-decay groups; fused kernels on CUDA, torch's default (foreach) elsewhere."""
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **extra)
