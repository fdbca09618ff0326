"""Modules inserted into a GPT's residual stream after a trunk block (GPT(inserts={block: spec})).

An insert is rebuilt from its spec (a JSON-able dict with `kind` and the constructor's arguments, saved in
model.json), returns the new stream and named tensors for the objective, and says how many stream positions
each token has after it (`slots`: 1 = added in place, 2 = interleaved as h_1, c_1, h_2, c_2, ...).

- `concepts` (CoCoMix, arXiv 2502.08524): parameter-free LayerNorm of h_t, concept logits
  z_t = W_pred (LN(h_t) - pre_bias) + b over the SAE's latents, continuous concept
  c_t = (W_comp TopK(z_t) + b_comp + pre_bias) * std_t + mu_t (TopK keeps the raw top-k logits, no ReLU;
  the compression touches only the k selected rows), mixed by interleaving (default) or addition.
  `steer` adds `scale * max_j |z_t,j|` to chosen concept logits before TopK (amplify > 0, suppress < 0).
- `pause`: the same interleaving with one learned vector instead of c_t (the compute-matched control); the
  next token is read from the pause slot (`readout="pause"`, as CoCoMix reads its concept slot) or from the
  token's own slot (`readout="token"`: the pause slots only add positions to attend to).
Interleaving inserts say which of a token's slots the next-token head reads (`readout_slot`: 1 = the inserted
slot, 0 = the token's own).
Shapes: B batch, T tokens, D d_model, L latents (concepts), K kept concepts.
"""

import torch
from torch import nn

from schemas.configs import ModelConfig
from stages.models.sae import layer_norm_stats, sparse_decode

MIXINGS = ("interleave", "add")


def interleave(h_BTD: torch.Tensor, c_BTD: torch.Tensor) -> torch.Tensor:
    """(B, 2T, D) stream h_1, c_1, h_2, c_2, ... (each concept slot right after its token)."""
    B, T, D = h_BTD.shape
    return torch.stack([h_BTD, c_BTD], dim=2).view(B, 2 * T, D)


class ConceptMixer(nn.Module):
    """CoCoMix concept head and mixing: predicts concept logits and mixes a compressed concept vector back."""

    def __init__(self, d_model: int, num_latents: int, num_active: int, mixing: str = "interleave",
                 generator: torch.Generator | None = None):
        super().__init__()
        if mixing not in MIXINGS:
            raise ValueError(f"concept mixing {mixing!r}: expected one of {MIXINGS}")
        if not 1 <= num_active <= num_latents:
            raise ValueError(f"num_active={num_active} must be in 1..num_latents ({num_latents})")
        self.d_model, self.num_latents, self.num_active, self.mixing = d_model, num_latents, num_active, mixing
        self.slots = 2 if mixing == "interleave" else 1
        self.readout_slot = self.slots - 1
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.predictor = nn.Linear(d_model, num_latents)
        self.compress_LD = nn.Parameter(torch.empty(num_latents, d_model))
        self.compress_bias = nn.Parameter(torch.zeros(d_model))
        self.steer: dict[int, float] = {}
        """concept id -> scale; runtime only (not saved), set by `lmpipe steer`."""
        self.reset_parameters(generator=generator)

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) weights, zero biases (GPT-2 init, as CoCoMix's code)."""
        nn.init.normal_(self.predictor.weight, std=std, generator=generator)
        nn.init.normal_(self.compress_LD, std=std, generator=generator)
        for bias in (self.predictor.bias, self.compress_bias, self.pre_bias):
            nn.init.zeros_(bias)

    def spec(self) -> dict:
        """Constructor arguments (model.json)."""
        return {"kind": "concepts", "num_latents": self.num_latents, "num_active": self.num_active,
                "mixing": self.mixing}

    def concept_logits(self, xn_BTD: torch.Tensor) -> torch.Tensor:
        """z_BTL from the normalised hidden state, with steering applied."""
        z_BTL = self.predictor(xn_BTD - self.pre_bias)
        if self.steer:
            ids = torch.tensor(list(self.steer), device=z_BTL.device)
            scales = torch.tensor(list(self.steer.values()), device=z_BTL.device, dtype=z_BTL.dtype)
            z_BTL = z_BTL.index_add(-1, ids, z_BTL.detach().abs().amax(-1, keepdim=True) * scales)
        return z_BTL

    def forward(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """New stream and {"concept_logits_BTL": z}."""
        xn_BTD, mu_BT1, std_BT1 = layer_norm_stats(h_BTD)
        z_BTL = self.concept_logits(xn_BTD)
        vals_BTK, idx_BTK = z_BTL.topk(self.num_active, dim=-1, sorted=False)
        c_BTD = sparse_decode(vals_BTK, idx_BTK, self.compress_LD) + self.compress_bias + self.pre_bias
        c_BTD = c_BTD * std_BT1 + mu_BT1
        mixed = interleave(h_BTD, c_BTD) if self.mixing == "interleave" else h_BTD + c_BTD
        return mixed, {"concept_logits_BTL": z_BTL}


READOUTS = ("pause", "token")


class PauseInsert(nn.Module):
    """Interleaves one learned vector after every token (a pause token; no concept information)."""

    slots = 2

    def __init__(self, d_model: int, readout: str = "pause", generator: torch.Generator | None = None):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"pause readout {readout!r}: expected one of {READOUTS}")
        self.d_model, self.readout = d_model, readout
        self.readout_slot = 1 if readout == "pause" else 0
        self.vector_D = nn.Parameter(torch.empty(d_model))
        self.reset_parameters(generator=generator)

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) init."""
        nn.init.normal_(self.vector_D, std=std, generator=generator)

    def spec(self) -> dict:
        """Constructor arguments (model.json)."""
        return {"kind": "pause"} if self.readout == "pause" else {"kind": "pause", "readout": self.readout}

    def forward(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, 2T, D) stream with the pause vector in every second slot."""
        return interleave(h_BTD, self.vector_D.expand_as(h_BTD)), {}


def build_insert(spec: dict, cfg: ModelConfig, generator: torch.Generator | None = None) -> nn.Module:
    """The insert module of a spec ({"kind": "concepts" | "pause", ...}), initialised from `generator`."""
    args = dict(spec)
    kind = args.pop("kind", None)
    if kind == "concepts":
        return ConceptMixer(cfg.d_model, **args, generator=generator)
    if kind == "pause":
        return PauseInsert(cfg.d_model, **args, generator=generator)
    raise ValueError(f"unknown insert kind {kind!r} in {spec}; expected 'concepts' or 'pause'")
