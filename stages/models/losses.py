"""Per-token losses from logits, in fp32, without extra passes over the (B, T, V) logits.

- `token_loss_and_entropy`: -log p(target) and the entropy of p, for scoring (no gradient). The rows are
  processed in chunks of about `CPU_CHUNK_ELEMENTS` logits into two preallocated fp32 work buffers, so the
  log-softmax, its exp and the p * log p reduction read and write cache-resident memory instead of making
  four full passes over (and page-faulting four fresh) (B, T, V) fp32 temporaries. Same kernels, formula and
  per-row reduction as log_softmax -> gather -> -(exp(logp) * logp).sum(-1), so the results are the same.
- `hidden_loss_and_entropy`: the same from the final hidden states and the unembedding matrix, blocks of rows
  at a time, so the (B, T, V) logits are never materialized (their allocation alone, page faults included,
  costs on CPU as much as the unembedding matmul).
- `token_loss`: unreduced cross-entropy (0 at ignored targets), differentiable: the same chunking in an autograd
  Function that keeps two floats per row for backward (F.cross_entropy keeps the whole fp32 log-softmax) and
  writes the gradient (softmax - onehot) * grad in one chunked pass.
- `frozen_unembed_loss`: unreduced cross-entropy from the final hidden states through a frozen unembedding,
  differentiable in the hidden states: each block of rows yields its loss and its gradient in one pass, so the
  logits are never materialized nor recomputed (what extraction's dL/dh needs).

Shapes: B batch, T time, V vocab, N = B * T rows.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CPU_CHUNK_ELEMENTS = 1 << 18
"""Logits per chunk on CPU: 256k fp32 = 1 MiB per work buffer, the two buffers split over the cores' L2 caches.
Measured on the default model (V = 4096, 2 cores): 48-64 rows per chunk is the fastest (16 rows: +50%, 96: +5%,
unchunked: 5x)."""
DEVICE_CHUNK_ELEMENTS = 1 << 26
"""Logits per chunk elsewhere (CUDA): few kernel launches, and fp32 work buffers of at most 256 MiB each."""


def _chunk_rows(logits_NV: torch.Tensor, chunk_elements: int | None) -> int:
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if logits_NV.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(1, min(logits_NV.shape[0], chunk_elements // max(1, logits_NV.shape[1])))


def token_loss_and_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100,
                           chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 per-token loss -log p(target) and entropy (nats) of p = softmax(logits), each of shape (B, T).

    Any float dtype in (bf16 logits are converted chunk by chunk). Targets equal to `ignore_index` get loss 0
    (their entropy is still computed). Not differentiable through the chunked path: with grad enabled and
    logits that require grad, the plain formula runs instead.
    """
    *lead, V = logits_BTV.shape
    if targets_BT.shape != tuple(lead):
        raise ValueError(f"targets of shape {tuple(targets_BT.shape)} do not match logits {tuple(logits_BTV.shape)}")
    valid_BT = targets_BT != ignore_index
    safe_BT = targets_BT.masked_fill(~valid_BT, 0)
    if torch.is_grad_enabled() and logits_BTV.requires_grad:
        logp_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
        loss_BT = -logp_BTV.gather(-1, safe_BT.unsqueeze(-1)).squeeze(-1)
        return loss_BT.masked_fill(~valid_BT, 0.0), -(logp_BTV.exp() * logp_BTV).sum(-1)
    logits_NV = logits_BTV.reshape(-1, V)
    targets_N1 = safe_BT.reshape(-1, 1)
    N = logits_NV.shape[0]
    loss_N1 = torch.empty(N, 1, dtype=torch.float32, device=logits_NV.device)
    entropy_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
    rows = _chunk_rows(logits_NV, chunk_elements)
    logp_RV = torch.empty(min(rows, N), V, dtype=torch.float32, device=logits_NV.device)
    p_RV = torch.empty_like(logp_RV)
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        logp, p = logp_RV[: stop - start], p_RV[: stop - start]
        torch.log_softmax(logits_NV[start:stop], -1, dtype=torch.float32, out=logp)
        torch.gather(logp, 1, targets_N1[start:stop], out=loss_N1[start:stop])
        torch.exp(logp, out=p)
        torch.sum(p.mul_(logp), -1, out=entropy_N[start:stop])
    loss_BT = loss_N1.view(lead).neg_().masked_fill_(~valid_BT, 0.0)
    return loss_BT, entropy_N.view(lead).neg_()


def hidden_loss_and_entropy(h_BTD: torch.Tensor, unembed_VD: torch.Tensor, targets_BT: torch.Tensor,
                            ignore_index: int = -100, block_elements: int | None = None,
                            chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_loss_and_entropy(h_BTD @ unembed_VD.T, targets_BT)` without materializing the (B, T, V) logits.

    `h_BTD` is what the unembedding reads (after the final norm). Rows go through the unembedding in blocks of
    about `block_elements` logits (default 4M on CPU, 64M elsewhere: large enough for an efficient matmul), each
    block then scored chunk by chunk. Without grad or autocast the blocks reuse one buffer (a fresh multi-MiB
    tensor per block costs page faults on CPU); otherwise F.linear runs as the model's lm_head would (autocast).
    """
    *lead, D = h_BTD.shape
    h_ND = h_BTD.reshape(-1, D)
    targets_N = targets_BT.reshape(-1)
    N, V = h_ND.shape[0], unembed_VD.shape[0]
    if targets_N.shape[0] != N:
        raise ValueError(f"targets of shape {tuple(targets_BT.shape)} do not match hidden {tuple(h_BTD.shape)}")
    if block_elements is None:
        block_elements = 1 << 22 if h_ND.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    rows = max(1, min(N, block_elements // V))
    reuse = (h_ND.dtype == unembed_VD.dtype and not torch.is_autocast_enabled(h_ND.device.type)
             and not (torch.is_grad_enabled() and (h_ND.requires_grad or unembed_VD.requires_grad)))
    logits_RV = h_ND.new_empty(rows, V) if reuse and N else None
    loss_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
    entropy_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        if logits_RV is not None:
            logits = torch.matmul(h_ND[start:stop], unembed_VD.t(), out=logits_RV[: stop - start])
        else:
            logits = F.linear(h_ND[start:stop], unembed_VD)
        loss_N[start:stop], entropy_N[start:stop] = token_loss_and_entropy(logits, targets_N[start:stop],
                                                                           ignore_index, chunk_elements)
    return loss_N.view(lead), entropy_N.view(lead)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (N, V) logits in fp32, chunk by chunk. Forward keeps two numbers per row, the max m and
    log sum exp(x - m) (kept apart: their sum rounds at the magnitude of m, the log-softmax x - m - log-sum does
    not), instead of an (N, V) log-softmax; backward writes (softmax - onehot) * grad straight into the gradient."""

    @staticmethod
    def forward(ctx, logits_NV, targets_N, ignore_index: int, rows: int):
        N, V = logits_NV.shape
        valid_N = targets_N != ignore_index
        safe_N1 = targets_N.masked_fill(~valid_N, 0).unsqueeze(1)
        max_N1 = torch.empty(N, 1, dtype=torch.float32, device=logits_NV.device)
        sumexp_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
        work_RV = torch.empty(min(rows, N), V, dtype=torch.float32, device=logits_NV.device)
        for start in range(0, N, rows):
            stop = min(start + rows, N)
            x, work = logits_NV[start:stop], work_RV[: stop - start]
            max_N1[start:stop] = x.amax(-1, keepdim=True)
            torch.sub(x, max_N1[start:stop], out=work)
            torch.sum(work.exp_(), -1, out=sumexp_N[start:stop])
        logsum_N1 = sumexp_N.log_().unsqueeze(1)
        loss_N = (logsum_N1 + (max_N1 - logits_NV.gather(1, safe_N1).float())).squeeze(1)
        ctx.save_for_backward(logits_NV, safe_N1, valid_N, max_N1, logsum_N1)
        ctx.rows = rows
        return loss_N.masked_fill_(~valid_N, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_N):
        logits_NV, safe_N1, valid_N, max_N1, logsum_N1 = ctx.saved_tensors
        N, V = logits_NV.shape
        grad_N1 = (grad_N.float() * valid_N).unsqueeze(1)
        grad_NV = torch.empty_like(logits_NV, memory_format=torch.contiguous_format)
        work_RV = None if logits_NV.dtype == torch.float32 else torch.empty(
            min(ctx.rows, N), V, dtype=torch.float32, device=logits_NV.device)
        for start in range(0, N, ctx.rows):
            stop = min(start + ctx.rows, N)
            p = grad_NV[start:stop] if work_RV is None else work_RV[: stop - start]
            torch.sub(logits_NV[start:stop], max_N1[start:stop], out=p)
            p.sub_(logsum_N1[start:stop]).exp_().mul_(grad_N1[start:stop])
            if work_RV is not None:
                grad_NV[start:stop] = p
        grad_NV.scatter_add_(1, safe_N1, -grad_N1.to(grad_NV.dtype))
        return grad_NV, None, None, None


class _FrozenUnembedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of h @ W.T in fp32, blocks of rows at a time, W frozen. When h needs a gradient, forward
    also writes each row's (softmax - onehot) @ W while the block's logits are at hand, and backward scales those
    rows by their incoming gradients (exact: a row's loss depends on that row of h alone)."""

    @staticmethod
    def forward(ctx, h_ND, unembed_VD, targets_N, rows: int):
        N, V = h_ND.shape[0], unembed_VD.shape[0]
        loss_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        grad_ND = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        logits_RV = torch.empty(min(rows, N), V, dtype=torch.float32, device=h_ND.device)
        for start in range(0, N, rows):
            stop = min(start + rows, N)
            x = torch.matmul(h_ND[start:stop], unembed_VD.t(), out=logits_RV[: stop - start])
            target_R1 = targets_N[start:stop].unsqueeze(1)
            x.sub_(x.amax(-1, keepdim=True))
            shifted_target_R1 = x.gather(1, target_R1)
            sumexp_R1 = x.exp_().sum(-1, keepdim=True)
            loss_N[start:stop] = (sumexp_R1.log() - shifted_target_R1).squeeze(1)
            if grad_ND is not None:
                x.div_(sumexp_R1).scatter_add_(1, target_R1, torch.full_like(shifted_target_R1, -1.0))
                torch.matmul(x, unembed_VD, out=grad_ND[start:stop])
        ctx.save_for_backward(grad_ND)
        return loss_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_N):
        (grad_ND,) = ctx.saved_tensors
        return grad_ND * grad_N.unsqueeze(1), None, None, None


FROZEN_BLOCK_ELEMENTS = 1 << 21
"""Logits per block of frozen_unembed_loss (8 MiB fp32). CPU, N 4,096, D 128, V 4,096, loss and dL/dh: 32 rows
128 ms, 128 rows 101 ms, 512 rows 87 ms, 1,024 rows 88 ms, all rows at once 104 ms (F.cross_entropy on
materialized logits with autograd: 178 ms)."""


def frozen_unembed_loss(h_BTD: torch.Tensor, unembed_VD: torch.Tensor, targets_BT: torch.Tensor,
                        block_elements: int = FROZEN_BLOCK_ELEMENTS) -> torch.Tensor:
    """Unreduced cross-entropy of `h_BTD @ unembed_VD.T` (fp32, shape (B, T)), differentiable in h_BTD only.

    For a frozen unembedding (it gets no gradient: an error if it asks for one): the loss and dLoss/dh of each
    block of about `block_elements` logits come out of one pass over them, so the (N, V) logits are neither
    kept nor recomputed. Its use: extraction's dL/dh (GPT.loss_from)."""
    if unembed_VD.requires_grad and torch.is_grad_enabled():
        raise ValueError("frozen_unembed_loss gives the unembedding no gradient: freeze it "
                         "(requires_grad_(False)) or use token_loss on the logits")
    if h_BTD.dtype != torch.float32 or unembed_VD.dtype != torch.float32:
        raise ValueError(f"frozen_unembed_loss computes in fp32: got {h_BTD.dtype} and {unembed_VD.dtype}")
    *lead, D = h_BTD.shape
    if targets_BT.shape != tuple(lead):
        raise ValueError(f"targets of shape {tuple(targets_BT.shape)} do not match hidden {tuple(h_BTD.shape)}")
    loss_N = _FrozenUnembedCrossEntropy.apply(h_BTD.reshape(-1, D), unembed_VD, targets_BT.reshape(-1),
                                              max(1, block_elements // unembed_VD.shape[0]))
    return loss_N.view(lead)


def token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100,
               chunk_elements: int | None = None) -> torch.Tensor:
    """Unreduced cross-entropy -log p(target) in fp32, shape (B, T); ignored targets get 0. Differentiable.

    Same values and gradients as F.cross_entropy(logits.float(), reduction="none") up to fp32 rounding. CPU,
    2048 x 4096 logits: 2.7 ms forward (F.cross_entropy 11 ms), 16 ms forward + backward (30 ms); it keeps 8
    bytes per row for backward instead of an fp32 (N, V) log-softmax.
    """
    *lead, V = logits_BTV.shape
    if targets_BT.shape != tuple(lead):
        raise ValueError(f"targets of shape {tuple(targets_BT.shape)} do not match logits {tuple(logits_BTV.shape)}")
    logits_NV = logits_BTV.reshape(-1, V)
    rows = _chunk_rows(logits_NV, chunk_elements)
    return _ChunkedCrossEntropy.apply(logits_NV, targets_BT.reshape(-1), ignore_index, rows).view(lead)
