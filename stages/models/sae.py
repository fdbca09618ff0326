"""TopK sparse autoencoder (Gao et al. 2024) for a transformer residual stream, plus CoCoMix concept attribution.

Recipe (OpenAI's released GPT-2 TopK SAEs, as used by CoCoMix):
- inputs are per-token layer-normalised by `layer_norm_stats` (no learned parameters) before `encode`;
- pre = (xn - pre_bias) @ W_enc.T + latent_bias, keep the top k per row, ReLU the kept values;
- xhat = sum of the k active decoder rows weighted by their values, + pre_bias (a sparse decode: the dense
  (N, L) latent matrix is never built);
- loss = FVU + aux_coef * AuxK (dead latents reconstruct the residual error); decoder rows stay unit-norm.

Training step order: `loss.backward(); sae.remove_parallel_grad_(); opt.step(); sae.normalize_decoder_()`.

Shapes: N rows (tokens), D d_model, L latents, K active latents per row, T top concepts per row.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTION_CHUNK_ELEMS = 1 << 24  # attribution_scores gathers at most this many W_dec entries at a time (64 MiB fp32)
DENSE_LATENTS_PER_ACTIVE = 64
"""attribution_scores takes the dense (N, L) product when L <= this many latents per active one: one matmul
then beats gathering K decoder rows per token (CPU, N 4096, D 128, L 1,024, K 16: 7 ms against 21 ms); at
32k latents and k 32 the gather is far cheaper."""

def layer_norm_stats(x_ND: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (x - mean) / (unbiased std + eps), differentiable; returns (xn, mean, std) with std excluding eps."""
    if x_ND.shape[-1] < 2:
        raise ValueError(f"layer_norm_stats needs a last dim >= 2 for an unbiased std, got shape {tuple(x_ND.shape)}")
    mu_N1 = x_ND.mean(dim=-1, keepdim=True)
    xc_ND = x_ND - mu_N1
    std_N1 = xc_ND.std(dim=-1, keepdim=True, correction=1)
    return xc_ND / (std_N1 + eps), mu_N1, std_N1


def geometric_median(points_ND: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations from the mean: the point minimising the sum of Euclidean distances to the rows."""
    if points_ND.ndim != 2 or points_ND.shape[0] < 1:
        raise ValueError(f"geometric_median needs a non-empty (N, D) tensor, got shape {tuple(points_ND.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    points_ND = points_ND.detach().double()
    median_D = points_ND.mean(dim=0)
    for _ in range(iters):
        weights_N = 1.0 / (points_ND - median_D).norm(dim=1).clamp_min(1e-12)
        new_D = (weights_N[:, None] * points_ND).sum(dim=0) / weights_N.sum()
        moved = (new_D - median_D).norm().item()
        median_D = new_D
        if moved <= tol * (1.0 + median_D.norm().item()):
            break
    return median_D


def sparse_decode(vals_NK: torch.Tensor, idx_NK: torch.Tensor, weight_LD: torch.Tensor) -> torch.Tensor:
    """sum_k vals[..., k] * weight[idx[..., k]], any leading shape, no bias; touches only the K rows (embedding_bag).

    CPU, quiet machine: forward + backward (grads to the K weight rows and to vals) measured 5-10x faster than a
    gather + bmm over (N, K, D) rows; both slow down when the cores are oversubscribed, embedding_bag's backward most.
    """
    lead, K = idx_NK.shape[:-1], idx_NK.shape[-1]
    out_ND = F.embedding_bag(idx_NK.reshape(-1, K), weight_LD, mode="sum",
                             per_sample_weights=vals_NK.reshape(-1, K).to(weight_LD.dtype))
    return out_ND.view(*lead, weight_LD.shape[1])


@dataclass
class SAEOutput:
    """One forward pass: the reconstruction and the K active values/indices per row (no dense (N, L) tensor kept)."""

    xhat_ND: torch.Tensor
    vals_NK: torch.Tensor
    idx_NK: torch.Tensor


class TopKSAE(nn.Module):
    """TopK SAE with tied init, a shared pre_bias, unit-norm decoder rows W_dec (L, D) and a sparse decode."""

    INPUT_NORMS = ("layer_norm", "none", "center")
    """How a residual becomes the SAE's input (`normalize`): lmpipe's per-token layer norm; none (a pretrained SAE
    on the raw residual); center (minus its per-token mean: SAEs of TransformerLens' centred GPT-2 residual)."""

    def __init__(self, d_model: int, num_latents: int, k: int, generator: torch.Generator | None = None,
                 input_norm: str = "layer_norm"):
        super().__init__()
        if input_norm not in self.INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {self.INPUT_NORMS}, got {input_norm!r}")
        self.input_norm = input_norm
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        if not 1 <= k <= num_latents:
            raise ValueError(f"k must be in [1, num_latents={num_latents}], got {k}")
        self.d_model, self.num_latents, self.k = d_model, num_latents, k
        bound = 1.0 / math.sqrt(d_model)  # nn.Linear's default (kaiming-uniform, a=sqrt(5)) range
        self.W_enc = nn.Parameter(torch.empty(num_latents, d_model).uniform_(-bound, bound, generator=generator))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.latent_bias = nn.Parameter(torch.zeros(num_latents))
        self.normalize_decoder_()

    def config(self) -> dict:
        """Constructor arguments, for saving next to the weights."""
        extra = {"input_norm": self.input_norm} if self.input_norm != "layer_norm" else {}
        return {"d_model": self.d_model, "num_latents": self.num_latents, "k": self.k} | extra

    def normalize(self, h_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(xn, mu, std) with xn the SAE's input and h = xn * std + mu (the reconstruction maps back likewise)."""
        if self.input_norm == "layer_norm":
            return layer_norm_stats(h_ND)
        ones = h_ND.new_ones(*h_ND.shape[:-1], 1)
        mu = h_ND.mean(dim=-1, keepdim=True) if self.input_norm == "center" else ones * 0
        return h_ND - mu, mu, ones

    def preactivations(self, xn_ND: torch.Tensor, latent_ids_M: torch.Tensor | None = None) -> torch.Tensor:
        """(xn - pre_bias) @ W_enc.T + latent_bias for all latents (N, L) or only latent_ids_M (N, M).

        pre_bias is folded into the bias, so its gradient is a mat-vec rather than an (N, L) x (L, D) matmul.
        """
        if xn_ND.shape[-1] != self.d_model:
            raise ValueError(f"input width {xn_ND.shape[-1]} != d_model {self.d_model}")
        W_MD, b_M = (self.W_enc, self.latent_bias) if latent_ids_M is None else (
            self.W_enc[latent_ids_M], self.latent_bias[latent_ids_M])
        return F.linear(xn_ND, W_MD, b_M - W_MD @ self.pre_bias)

    def encode(self, xn_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k pre-activations per row (unsorted), ReLU'd: (vals_NK >= 0, idx_NK)."""
        vals_NK, idx_NK = self.preactivations(xn_ND).topk(self.k, dim=-1, sorted=False)
        return vals_NK.relu(), idx_NK

    def decode(self, vals_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Sparse decode: sum_k vals[n, k] * W_dec[idx[n, k]] + pre_bias (touches only the K active rows)."""
        return sparse_decode(vals_NK, idx_NK, self.W_dec) + self.pre_bias

    def decode_dense(self, vals_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Reference decode through a dense (N, L) latent matrix; for tests and benchmarks only."""
        z_NL = vals_NK.new_zeros(vals_NK.shape[0], self.num_latents).scatter(1, idx_NK, vals_NK)
        return z_NL @ self.W_dec + self.pre_bias

    def forward(self, xn_ND: torch.Tensor) -> SAEOutput:
        """Encode and sparsely decode layer-normalised rows."""
        vals_NK, idx_NK = self.encode(xn_ND)
        return SAEOutput(self.decode(vals_NK, idx_NK), vals_NK, idx_NK)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit L2 norm (call after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop from W_dec.grad the component along each decoder row (call between backward and step)."""
        if self.W_dec.grad is None:
            return
        coef_L1 = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        coef_L1 /= self.W_dec.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_(coef_L1 * self.W_dec)

    @torch.no_grad()
    def init_pre_bias_(self, sample_ND: torch.Tensor, iters: int = 100) -> None:
        """Set pre_bias to the geometric median of a sample of (normalised) inputs."""
        if sample_ND.ndim != 2 or sample_ND.shape[1] != self.d_model:
            raise ValueError(f"sample must be (N, {self.d_model}), got shape {tuple(sample_ND.shape)}")
        self.pre_bias.copy_(geometric_median(sample_ND, iters).to(self.pre_bias.dtype))


def sae_loss(sae: TopKSAE, xn_ND: torch.Tensor, dead_mask_L: torch.Tensor | None, k_aux: int, aux_coef: float,
             out: SAEOutput | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FVU + aux_coef * AuxK; metrics (detached 0-dim tensors): fvu, l0, aux_loss, dead_fraction.

    AuxK: the top-min(k_aux, #dead) pre-activations among dead latents (ReLU'd; recomputed for the dead columns only)
    decode, without pre_bias, the detached residual x - xhat; normalised by that residual's batch variance.
    Skipped (0, no extra encode/decode) when nothing is dead.
    Pass `out` to reuse a forward pass (e.g. to feed the same idx/vals to a DeadLatentTracker).
    """
    if k_aux < 1:
        raise ValueError(f"k_aux must be >= 1, got {k_aux}")
    if dead_mask_L is not None and dead_mask_L.shape != (sae.num_latents,):
        raise ValueError(f"dead_mask_L must have shape ({sae.num_latents},), got {tuple(dead_mask_L.shape)}")
    out = sae(xn_ND) if out is None else out
    err_ND = xn_ND - out.xhat_ND
    fvu = err_ND.pow(2).sum() / (xn_ND - xn_ND.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    dead_M = dead_mask_L.nonzero().squeeze(1) if dead_mask_L is not None else out.idx_NK.new_zeros(0)
    num_dead = dead_M.numel()
    aux = fvu.new_zeros(())
    if num_dead > 0:  # cost scales with the number of dead latents
        aux_vals_NA, pos_NA = sae.preactivations(xn_ND, dead_M).topk(min(k_aux, num_dead), dim=-1, sorted=False)
        target_ND = err_ND.detach()
        ehat_ND = sparse_decode(aux_vals_NA.relu(), dead_M[pos_NA], sae.W_dec)
        aux = (ehat_ND - target_ND).pow(2).sum() / (target_ND - target_ND.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    metrics = {"fvu": fvu.detach(), "l0": (out.vals_NK > 0).sum(dim=-1).float().mean(), "aux_loss": aux.detach(),
               "dead_fraction": fvu.new_tensor(num_dead / sae.num_latents)}
    return fvu + aux_coef * aux, metrics


class DeadLatentTracker:
    """Counts, per latent, the tokens seen since it last fired (was active with value > fire_threshold)."""

    def __init__(self, num_latents: int, device: torch.device | str | None = None, fire_threshold: float = 1e-3):
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        self.fire_threshold = fire_threshold
        self.tokens_since_fired_L = torch.zeros(num_latents, dtype=torch.int64, device=device)

    def update(self, idx_NK: torch.Tensor, vals_NK: torch.Tensor, num_tokens: int | None = None) -> None:
        """Add num_tokens (default: N rows) to every counter, then zero the counters of latents that fired."""
        fired_L = torch.zeros_like(self.tokens_since_fired_L, dtype=torch.bool)
        fired_L[idx_NK[vals_NK > self.fire_threshold]] = True
        self.tokens_since_fired_L += idx_NK.shape[0] if num_tokens is None else num_tokens
        self.tokens_since_fired_L.masked_fill_(fired_L, 0)

    def dead_mask(self, threshold_tokens: int) -> torch.Tensor:
        """Bool (L,): latents that have not fired in more than threshold_tokens tokens."""
        if threshold_tokens < 0:
            raise ValueError(f"threshold_tokens must be >= 0, got {threshold_tokens}")
        return self.tokens_since_fired_L > threshold_tokens

    def state_dict(self) -> dict:
        """Counters for a checkpoint."""
        return {"tokens_since_fired": self.tokens_since_fired_L.clone(), "fire_threshold": self.fire_threshold}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by state_dict."""
        counts = state["tokens_since_fired"]
        if counts.shape != self.tokens_since_fired_L.shape:
            raise ValueError(f"tokens_since_fired has shape {tuple(counts.shape)}, "
                             f"expected {tuple(self.tokens_since_fired_L.shape)}")
        self.tokens_since_fired_L = counts.to(self.tokens_since_fired_L)
        self.fire_threshold = float(state.get("fire_threshold", self.fire_threshold))


@torch.no_grad()
def attribution_scores(grad_ND: torch.Tensor, vals_NK: torch.Tensor, idx_NK: torch.Tensor,
                       W_dec_LD: torch.Tensor) -> torch.Tensor:
    """CoCoMix attribution at the active latents (no autograd graph): vals[n, k] * (grad[n] . W_dec[idx[n, k]]).

    With xhat = sum_k vals_k W_dec[idx_k] + b and grad = dLoss/dxhat, this is a_i * dLoss/da_i per active latent:
    ((grad @ W_dec.T) * a) of the CoCoMix code gathered at idx: that dense product when the SAE has few latents
    per active one (DENSE_LATENTS_PER_ACTIVE), else a gather of the K active decoder rows per token. If grad is taken
    w.r.t. the raw residual h = xhat * std + mu, the exact chain rule has an extra per-row factor std > 0, which
    does not change the ranking within a row.
    """
    if grad_ND.shape[0] != idx_NK.shape[0] or vals_NK.shape != idx_NK.shape:
        raise ValueError(f"shape mismatch: grad {tuple(grad_ND.shape)}, vals {tuple(vals_NK.shape)}, "
                         f"idx {tuple(idx_NK.shape)}")
    (L, D), K = W_dec_LD.shape, idx_NK.shape[1]
    grad_ND = grad_ND.to(W_dec_LD.dtype)
    if L <= DENSE_LATENTS_PER_ACTIVE * K:  # rows per chunk of the (rows, L) product
        rows = max(1, ATTRIBUTION_CHUNK_ELEMS // L)
        dots = [(grad_ND[i:i + rows] @ W_dec_LD.T).gather(1, idx_NK[i:i + rows])
                for i in range(0, idx_NK.shape[0], rows)]
    else:  # rows per chunk of the gathered (rows, K, D) block
        rows = max(1, ATTRIBUTION_CHUNK_ELEMS // max(1, K * D))
        dots = [torch.einsum("nkd,nd->nk", W_dec_LD[idx_NK[i:i + rows]], grad_ND[i:i + rows])
                for i in range(0, idx_NK.shape[0], rows)]
    return vals_NK * torch.cat(dots).to(vals_NK.dtype)


def top_concepts(scores_NK: torch.Tensor, idx_NK: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` active latents per row by SIGNED score, descending: (concept_ids_NT, scores_NT).

    Sign convention (as in the CoCoMix code): score = a_i * dLoss/da_i, and setting a_i to 0 changes the loss by
    -score to first order, so the largest positive score is the latent whose removal would lower the loss most.
    Unlike the CoCoMix code (a top-k over all L latents, which returns arbitrary zero-score inactive latents when
    fewer than `top` scores are positive), this picks only among the K active latents, negative scores included.
    """
    if not 1 <= top <= scores_NK.shape[-1]:
        raise ValueError(f"top must be in [1, K={scores_NK.shape[-1]}], got {top}")
    scores_NT, pos_NT = scores_NK.topk(top, dim=-1, sorted=True)
    return idx_NK.gather(-1, pos_NT), scores_NT


ATTRIBUTIONS = ("window_mean", "token", "activation")
"""Labelling rules of window_concepts (ExtractConfig.attribution)."""


def token_loss_grads(model, h_BTD: torch.Tensor, layer: int, targets_BT: torch.Tensor) -> torch.Tensor:
    """dl_t/dh_t at every position: the gradient of each position's OWN next-token loss (x_{t+1} only) at its own
    residual after block `layer`, the earlier positions' keys and values held at their values and the later
    positions' losses left out (the window-mean gradient sums dl_s/dh_t over s >= t, divided by T).

    Exact, by causality: a KV cache of the window is filled once (no graph), then each position runs the blocks
    after `layer` alone over a copy of the cache up to it (its own key and value carry the gradient): T small
    passes costing about what one pass over the window does."""
    from stages.models.gpt import KVCache  # here: gpt imports this module (its concept insert)

    stop = model.num_trunk_layers + 1
    base = KVCache(model, h_BTD.shape[0], h_BTD.device, h_BTD.dtype)
    with torch.no_grad():
        model.run_blocks(h_BTD, layer + 1, stop, cache=base)
    grads = []
    for t in range(h_BTD.shape[1]):
        step = copy.copy(base)  # this position's cache: the window up to t, its slot t rewritten with a graph
        step.keys = [k[:, :, :t + 1].clone() for k in base.keys]
        step.values = [v[:, :, :t + 1].clone() for v in base.values]
        h_B1D = h_BTD[:, t:t + 1].detach().requires_grad_(True)
        with torch.enable_grad():
            out_B1D, _ = model.run_blocks(h_B1D, layer + 1, stop, token_start=t, cache=step)
            loss = F.cross_entropy(model.logits(out_B1D).float().flatten(0, 1), targets_BT[:, t], reduction="sum")
            grads.append(torch.autograd.grad(loss, h_B1D)[0])
    return torch.cat(grads, dim=1)


def window_concepts(model, sae, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, layer: int, top: int,
                    attribution: str = "window_mean"):
    """(concept_ids_NT, scores_NT, vals_NK, idx_NK) for the B*T positions of a batch of windows: the labelling
    step of extract_concepts. `model` is a GPT (residual_after, loss_from, run_blocks); the SAE reads the residual
    after block `layer`. Kept here, beside the attribution it composes, so it imports no stage machinery.

    `attribution` (ExtractConfig.attribution): `window_mean` scores a_i * dL/da_i with L each window's mean loss
    (CoCoMix's code); `token` the same with L = the position's own next-token loss (token_loss_grads);
    `activation` ranks the active latents by activation a_i (CoCoMix Fig. 6(a)'s control; scores = a_i)."""
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
    with torch.no_grad():
        h_BTD = model.residual_after(inputs_BT, layer)
    h_BTD = h_BTD.detach().requires_grad_(attribution == "window_mean")
    grad_BTD = None
    if attribution == "window_mean":
        with torch.enable_grad():
            # sum over windows of each window's mean loss: the gradient at a window is that of its own mean loss,
            # so scores do not depend on the extraction batch size (CoCoMix's batch mean only rescales them)
            loss = model.loss_from(h_BTD, layer, targets_BT) * inputs_BT.shape[0]
            (grad_BTD,) = torch.autograd.grad(loss, h_BTD)
    elif attribution == "token":
        grad_BTD = token_loss_grads(model, h_BTD, layer, targets_BT)
    with torch.no_grad():
        xn_ND, _, _ = sae.normalize(h_BTD.detach().flatten(0, 1))
        vals_NK, idx_NK = sae.encode(xn_ND)
        scores_NK = vals_NK if grad_BTD is None else attribution_scores(grad_BTD.flatten(0, 1), vals_NK, idx_NK,
                                                                         sae.W_dec)
        ids_NT, top_scores_NT = top_concepts(scores_NK, idx_NK, top)
    return ids_NT, top_scores_NT, vals_NK, idx_NK
