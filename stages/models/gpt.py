"""Decoder-only transformer: RMSNorm pre-norm, rotary positions, SwiGLU/GELU MLP, causal SDPA attention.

Built for the methods that plug in later:
- the last `num_future_tokens` blocks are prediction heads on a shared trunk (multi-token prediction,
  Gloeckle et al. 2024); head 0 is the ordinary next-token head, so with one head this is a plain GPT whose
  blocks are trunk_blocks + head_blocks[0] (the layer order a Llama export uses);
- `inserts[str(i)]` runs on the residual stream after block i (CoCoMix concept mixing, pause vectors); an
  interleaving insert doubles the stream after it (h_1, c_1, h_2, c_2, ...: each concept slot after its token,
  sharing its rotary position) and next-token logits are read from the concept slots (a pause insert may
  name the token's own slot instead);
- `trunk(..., capture_layers=...)` returns the hidden states of chosen blocks and what inserts produced, and
  `run_blocks(h, start, stop)` runs blocks on a given hidden state (attribution needs dL/dh at a layer);
- `features(idx)` is what the unembedding reads (scoring fuses lm_head with the loss: stages.models.losses), and a
  KV cache serves generation.

Attention is grouped-query when model.num_kv_heads < num_heads (query head h reads key/value head h // group,
as Llama's repeat_kv); the KV cache then holds only the key/value heads.

Shapes: B batch, T time (tokens), S stream positions (T * slots), D d_model, H heads, G key/value heads, K head
dim, V vocab.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from schemas.configs import Llama3RopeScaling, ModelConfig
from stages.models.inserts import build_insert
from stages.models.losses import frozen_unembed_loss, token_loss


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """MLP width: model.mlp_hidden when given, else mlp_ratio * d_model rounded up to a multiple of 8."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    return 8 * math.ceil(cfg.mlp_ratio * cfg.d_model / 8)


_SDPA_GQA = torch.__version__ >= (2, 5)
"""scaled_dot_product_attention takes fewer key/value heads than query heads (enable_gqa) from torch 2.5 on."""


def rotary_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None) -> torch.Tensor:
    """The head_dim / 2 angular frequencies theta^(-2i / head_dim), Llama-3-scaled when `scaling` is given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - scaling.low_freq_factor)
             / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0.0, 1.0)  # 1: short, 0: long waves
    return blend * inv_freq + (1 - blend) * inv_freq / scaling.factor


def rotary_tables(head_dim: int, max_len: int, theta: float,
                  scaling: Llama3RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_len, head_dim), halves repeated (the rotate-half convention of Llama)."""
    inv_freq = rotary_frequencies(head_dim, theta, scaling)
    angles_LK2 = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles_LK = torch.cat([angles_LK2, angles_LK2], dim=-1)
    return angles_LK.cos(), angles_LK.sin()


def _rotate(x_BHTK: torch.Tensor, cos_TK2: torch.Tensor, sin_TK2: torch.Tensor) -> torch.Tensor:
    """[x1*c - x2*s, x2*c + x1*s] for the halves x1, x2 of the last dim, each half written in place into one new
    tensor (no negated copy, no cat); dtype as x * cos."""
    half = x_BHTK.shape[-1] // 2
    x1, x2 = x_BHTK[..., :half], x_BHTK[..., half:]
    out = x_BHTK.new_empty(x_BHTK.shape, dtype=torch.promote_types(x_BHTK.dtype, cos_TK2.dtype))
    torch.mul(x1, cos_TK2, out=out[..., :half]).addcmul_(x2, sin_TK2, value=-1.0)
    torch.mul(x2, cos_TK2, out=out[..., half:]).addcmul_(x1, sin_TK2)
    return out


class _Rotary(torch.autograd.Function):
    """Rotary with the analytic backward: the gradient of a rotation by +angle is the rotation by -angle."""

    @staticmethod
    def forward(ctx, x_BHTK, cos_TK2, sin_TK2):
        ctx.save_for_backward(cos_TK2, sin_TK2)
        ctx.x_dtype = x_BHTK.dtype
        return _rotate(x_BHTK, cos_TK2, sin_TK2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_BHTK):
        cos_TK2, sin_TK2 = ctx.saved_tensors
        return _rotate(grad_BHTK, cos_TK2, -sin_TK2).to(ctx.x_dtype), None, None


def apply_rotary(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    """Rotate query/key pairs (i, i + K/2) by their position's angle: x * cos + rotate_half(x) * sin.

    Eager: 4 half-width kernels forward and 4 backward (the cat formula: ~5 full-width forward, ~8 backward,
    2x slower on CPU); under torch.compile the plain formula, which Inductor fuses."""
    half = x_BHTK.shape[-1] // 2
    if torch.compiler.is_compiling():
        rotated = torch.cat([-x_BHTK[..., half:], x_BHTK[..., :half]], dim=-1)
        return x_BHTK * cos_TK + rotated * sin_TK
    return _Rotary.apply(x_BHTK, cos_TK[..., :half], sin_TK[..., :half])


class _RMSNormFunction(torch.autograd.Function):
    """weight * x * rsqrt(mean(x^2) + eps) with a hand-written backward (CPU has no fused RMSNorm backward;
    autograd through nn.RMSNorm runs ~10 elementwise kernels):
    dx = rstd * (g*w - xhat * mean(g*w * xhat)), dw = sum over rows of g * xhat, xhat = x * rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd
        grad_w_x = grad * weight
        dot = torch.linalg.vecdot(grad_w_x, xhat).unsqueeze(-1) / x.shape[-1]
        grad_x = torch.addcmul(grad_w_x, xhat, dot, value=-1.0).mul_(rstd)
        return grad_x, (grad * xhat).reshape(-1, x.shape[-1]).sum(0), None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same values); on CPU in eager mode with the hand-written backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.weight is None or torch.compiler.is_compiling():
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)


class KVCache:
    """Preallocated keys/values for every block; `pos` is the number of TOKENS already cached.

    A block after an interleaving insert holds `slots` positions per token (h_t, c_t), so its cache is
    `slots` times longer and token t occupies slots t*slots .. t*slots + slots - 1.
    """

    def __init__(self, model: "GPT", batch_size: int, device: torch.device, dtype: torch.dtype):
        cfg = model.cfg
        self.keys, self.values = [], []
        for layer in range(cfg.num_layers):
            shape = (batch_size, cfg.kv_heads, model.max_seq_len * model.slots_at(layer), cfg.head_dim)
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.pos = 0

    def truncate(self, num_tokens: int) -> None:
        """Forget every token after the first `num_tokens` (stale keys/values are overwritten on reuse)."""
        if not 0 <= num_tokens <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} tokens to {num_tokens}")
        self.pos = num_tokens


class Attention(nn.Module):
    """Causal self-attention with rotary positions: multi-head, or grouped-query with fewer key/value heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTD, cos_TK, sin_TK, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        """`start`: cache slots already filled for this layer (queries sit at slots start..start+T-1)."""
        B, T, D = x_BTD.shape
        split = lambda t, heads: t.view(B, T, heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q_BHTK = apply_rotary(split(self.q_proj(x_BTD), self.num_heads), cos_TK, sin_TK)
        k_BGTK = apply_rotary(split(self.k_proj(x_BTD), self.kv_heads), cos_TK, sin_TK)
        v_BGTK = split(self.v_proj(x_BTD), self.kv_heads)
        mask = None
        is_causal = T > 1
        if cache is not None:
            cache.keys[layer][:, :, start:start + T] = k_BGTK
            cache.values[layer][:, :, start:start + T] = v_BGTK
            k_BGTK = cache.keys[layer][:, :, : start + T]
            v_BGTK = cache.values[layer][:, :, : start + T]
            if start > 0:  # queries at absolute positions start..start+T-1 see keys up to their own position
                is_causal = False
                mask = torch.arange(start + T, device=x_BTD.device)[None, :] <= (
                    start + torch.arange(T, device=x_BTD.device)[:, None])
        gqa = {}
        if self.kv_heads != self.num_heads:  # query head h reads key/value head h // group (contiguous groups)
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                group = self.num_heads // self.kv_heads
                k_BGTK, v_BGTK = k_BGTK.repeat_interleave(group, dim=1), v_BGTK.repeat_interleave(group, dim=1)
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BGTK, v_BGTK, attn_mask=mask, is_causal=is_causal, **gqa)
        return self.o_proj(y_BHTK.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """SwiGLU (gate * up -> down) or GELU MLP, without biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.kind = cfg.mlp
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False) if cfg.mlp == "swiglu" else None
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))
        return self.down_proj(F.gelu(self.up_proj(x_BTD)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD, cos_TK, sin_TK, cache: KVCache | None = None, layer: int = 0,
                start: int = 0) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TK, sin_TK, cache, layer, start)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


@dataclass
class TrunkOutput:
    """The trunk's output stream, the residual after captured blocks, and what inserts produced."""

    h_BSD: torch.Tensor
    """Residual stream after the trunk; S = T * slots (interleaved concept slots after an insert)."""
    slots: int
    """Positions per token in h_BSD (1, or 2 after an interleaving insert)."""
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    """block index -> residual stream after that block (before any insert after it)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors the inserts produced (e.g. `concept_logits_BTL`), for the objective."""


class GPT(nn.Module):
    """Shared trunk + `num_future_tokens` one-block heads + shared final norm and unembedding.

    `inserts` maps a block index i to an insert spec (stages/models/inserts.py): the module runs on the residual
    stream after block i. Everything needed to rebuild the model is in `build_spec()` (saved as model.json).
    The initial weights are drawn from `generator` (torch's global stream when None): a seeded generator gives the
    same weights whatever else the process draws meanwhile, e.g. other stages building models in other threads.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int, num_future_tokens: int = 1,
                 inserts: dict[int, dict] | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not 1 <= num_future_tokens <= cfg.num_layers:
            raise ValueError(f"num_future_tokens={num_future_tokens} must be in 1..model.num_layers "
                             f"({cfg.num_layers}): each head is one block")
        self.cfg, self.vocab_size, self.max_seq_len = cfg, vocab_size, max_seq_len
        self.num_future_tokens = num_future_tokens
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.trunk_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers - num_future_tokens))
        self.head_blocks = nn.ModuleList(Block(cfg) for _ in range(num_future_tokens))
        self.inserts = nn.ModuleDict()
        self.insert_specs = {int(layer): dict(spec) for layer, spec in (inserts or {}).items()}
        for layer, spec in sorted(self.insert_specs.items()):
            if not 0 <= layer < self.num_trunk_layers:
                raise ValueError(f"insert after block {layer}: must be a trunk block 0..{self.num_trunk_layers - 1}")
            self.inserts[str(layer)] = build_insert(spec, cfg, generator)
        if sum(m.slots > 1 for m in self.inserts.values()) > 1:
            raise ValueError("at most one interleaving insert per model")
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.head_dim, max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(generator)

    def _init_weights(self, generator: torch.Generator | None) -> None:
        """GPT-2 init: normal(0, init_std) embeddings and linear weights, init_std / sqrt(2 * num_layers) for the
        projections into the residual stream; the inserts initialise themselves (already done in their init)."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if name.startswith("inserts.") or not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            std = residual_std if name.endswith(("o_proj", "down_proj")) else self.cfg.init_std
            nn.init.normal_(module.weight, std=std, generator=generator)

    def build_spec(self) -> dict:
        """Everything needed to rebuild this model (saved as model.json by storage.checkpoints.save_model)."""
        return {"model": self.cfg.model_dump(mode="json"), "vocab_size": self.vocab_size,
                "seq_len": self.max_seq_len, "num_future_tokens": self.num_future_tokens,
                "inserts": {str(layer): spec for layer, spec in sorted(self.insert_specs.items())}}

    @property
    def num_trunk_layers(self) -> int:
        """Blocks in the shared trunk."""
        return len(self.trunk_blocks)

    def slots_at(self, layer: int) -> int:
        """Positions per token in block `layer` (2 after an interleaving insert before it, else 1)."""
        return math.prod(int(m.slots) for i, m in self.inserts.items() if int(i) < layer)

    @property
    def readout_slot(self) -> int:
        """Which of a token's slots the heads read after an interleaving insert (its `readout_slot`; 0 without)."""
        return next((int(m.readout_slot) for m in self.inserts.values() if m.slots > 1), 0)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (by default without the embedding, as in the 6N FLOPs estimate)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if non_embedding else total

    def _rope(self, start: int, length: int, slots: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of tokens start..start+length-1, each repeated `slots` times (a concept slot shares its
        token's rotary position)."""
        if start + length > self.max_seq_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds the model context ({self.max_seq_len})")
        cos, sin = self.rope_cos[start:start + length], self.rope_sin[start:start + length]
        if slots > 1:
            cos, sin = cos.repeat_interleave(slots, dim=0), sin.repeat_interleave(slots, dim=0)
        return cos, sin

    def _block(self, layer: int) -> Block:
        return self.trunk_blocks[layer] if layer < self.num_trunk_layers else self.head_blocks[0]

    def run_blocks(self, h_BSD: torch.Tensor, start: int, stop: int, *, token_start: int = 0,
                   cache: KVCache | None = None, capture_layers: tuple[int, ...] = (),
                   extras: dict | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks start..stop-1 (trunk blocks, then head 0) on a residual stream, applying inserts after
        trunk blocks; returns the stream and the residual after each captured block."""
        if not 0 <= start <= stop <= self.num_trunk_layers + 1:
            raise ValueError(f"blocks {start}..{stop} outside 0..{self.num_trunk_layers + 1}")
        captured = {}
        for layer in range(start, stop):
            slots = self.slots_at(layer)
            cos_SK, sin_SK = self._rope(token_start, h_BSD.shape[1] // slots, slots)
            h_BSD = self._block(layer)(h_BSD, cos_SK, sin_SK, cache, layer, token_start * slots)
            if layer in capture_layers:
                captured[layer] = h_BSD
            if layer < self.num_trunk_layers and str(layer) in self.inserts:
                h_BSD, produced = self.inserts[str(layer)](h_BSD)
                if extras is not None:
                    extras.update(produced)
        return h_BSD, captured

    def trunk(self, idx_BT: torch.Tensor, cache: KVCache | None = None,
              capture_layers: tuple[int, ...] = ()) -> TrunkOutput:
        """Embed and run the trunk; returns its output stream, captured residuals and the inserts' outputs."""
        extras: dict[str, torch.Tensor] = {}
        h_BSD, captured = self.run_blocks(self.embed(idx_BT), 0, self.num_trunk_layers,
                                          token_start=cache.pos if cache else 0, cache=cache,
                                          capture_layers=capture_layers, extras=extras)
        return TrunkOutput(h_BSD, self.slots_at(self.num_trunk_layers), captured, extras)

    def head(self, trunk_out: TrunkOutput, index: int, cache: KVCache | None = None) -> torch.Tensor:
        """Head `index` (0 = next token, i = token t+1+i) on the trunk output; returns its (B, T, D) readout
        (after an interleaving insert, the slot it names: the concept or pause slot, or the token's own)."""
        layer, slots = self.num_trunk_layers + index, trunk_out.slots
        h_BSD = trunk_out.h_BSD
        token_start = cache.pos if cache else 0
        cos_SK, sin_SK = self._rope(token_start, h_BSD.shape[1] // slots, slots)
        h_BSD = self.head_blocks[index](h_BSD, cos_SK, sin_SK, cache, layer, token_start * slots)
        B, S, D = h_BSD.shape
        return h_BSD.view(B, S // slots, slots, D)[:, :, self.readout_slot] if slots > 1 else h_BSD

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Shared final norm and unembedding."""
        return self.lm_head(self.norm(h_BTD))

    def features(self, idx_BT: torch.Tensor) -> torch.Tensor:
        """Head 0 after the final norm, what lm_head reads: forward(idx) == lm_head(features(idx)) (no cache)."""
        return self.norm(self.head(self.trunk(idx_BT), 0))

    def forward(self, idx_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits (head 0) of shape (B, T, V); advances the cache when one is given."""
        logits_BTV = self.logits(self.head(self.trunk(idx_BT, cache), 0, cache))
        if cache is not None:
            cache.pos += idx_BT.shape[1]
        return logits_BTV

    def residual_after(self, idx_BT: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual stream after block `layer` (trunk blocks, then head 0), inserts applied before it."""
        h_BSD, _ = self.run_blocks(self.embed(idx_BT), 0, layer + 1)
        return h_BSD

    def loss_from(self, h_BTD: torch.Tensor, layer: int, targets_BT: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss (fp32) when the residual after block `layer` is h_BTD (runs the remaining blocks
        and head 0; a model without interleaving inserts after `layer`). Extraction's dL/dh runs through it: with
        a frozen fp32 unembedding, frozen_unembed_loss (loss and gradient in one pass, no (N, V) logits kept);
        otherwise the chunked token_loss on the logits. Both give F.cross_entropy's value."""
        out_BTD, _ = self.run_blocks(h_BTD, layer + 1, self.num_trunk_layers + 1)
        unembed_VD = self.lm_head.weight
        if not unembed_VD.requires_grad and out_BTD.dtype == unembed_VD.dtype == torch.float32:
            return frozen_unembed_loss(self.norm(out_BTD), unembed_VD, targets_BT).mean()
        return token_loss(self.logits(out_BTD), targets_BT).mean()

    def forward_heads(self, idx_BT: torch.Tensor, cache: KVCache | None = None,
                      num_heads: int | None = None) -> tuple[list[torch.Tensor], TrunkOutput]:
        """Logits of the first `num_heads` heads (default all; element i predicts token t+1+i) and the trunk
        output they share; advances the cache when one is given."""
        trunk_out = self.trunk(idx_BT, cache)
        heads = range(self.num_future_tokens if num_heads is None else num_heads)
        logits = [self.logits(self.head(trunk_out, i, cache)) for i in heads]
        if cache is not None:
            cache.pos += idx_BT.shape[1]
        return logits, trunk_out
