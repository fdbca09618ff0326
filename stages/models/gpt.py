"""Decoder-only transformer: RMSNorm pre-norm, rotary positions, SwiGLU/GELU MLP, causal SDPA attention.

Built for the methods that plug in later:
- the last `num_future_tokens` blocks are prediction heads on a shared trunk (multi-token prediction,
  Gloeckle et al. 2024); head 0 is the ordinary next-token head, so with one head this is a plain GPT whose
  blocks are trunk_blocks + head_blocks[0] (the layer order a Llama export uses);
- `inserts[str(i)]` is applied to the residual stream after block i (CoCoMix concept mixing);
- `trunk(..., capture_layers=...)` returns the hidden states of chosen blocks;
- losses come out unreduced (`per_token_loss`), and a KV cache serves generation.

Shapes: B batch, T time, D d_model, H heads, K head dim, V vocab.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from schemas.configs import ModelConfig


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """MLP width: mlp_ratio * d_model rounded up to a multiple of 8."""
    return 8 * math.ceil(cfg.mlp_ratio * cfg.d_model / 8)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_len, head_dim), halves repeated (the rotate-half convention of Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles_LK2 = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles_LK = torch.cat([angles_LK2, angles_LK2], dim=-1)
    return angles_LK.cos(), angles_LK.sin()


def apply_rotary(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    """Rotate query/key pairs (i, i + K/2) by their position's angle."""
    half = x_BHTK.shape[-1] // 2
    rotated = torch.cat([-x_BHTK[..., half:], x_BHTK[..., :half]], dim=-1)
    return x_BHTK * cos_TK + rotated * sin_TK


class KVCache:
    """Preallocated keys/values for every block; `pos` is the number of positions already cached."""

    def __init__(self, model: "GPT", batch_size: int, device: torch.device, dtype: torch.dtype):
        cfg = model.cfg
        shape = (batch_size, cfg.num_heads, model.max_seq_len, cfg.d_model // cfg.num_heads)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.pos = 0


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTD, cos_TK, sin_TK, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, D = x_BTD.shape
        split = lambda t: t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # noqa: E731
        q_BHTK = apply_rotary(split(self.q_proj(x_BTD)), cos_TK, sin_TK)
        k_BHTK = apply_rotary(split(self.k_proj(x_BTD)), cos_TK, sin_TK)
        v_BHTK = split(self.v_proj(x_BTD))
        mask = None
        is_causal = T > 1
        if cache is not None:
            start = cache.pos
            cache.keys[layer][:, :, start:start + T] = k_BHTK
            cache.values[layer][:, :, start:start + T] = v_BHTK
            k_BHTK = cache.keys[layer][:, :, : start + T]
            v_BHTK = cache.values[layer][:, :, : start + T]
            if start > 0:  # queries at absolute positions start..start+T-1 see keys up to their own position
                is_causal = False
                mask = torch.arange(start + T, device=x_BTD.device)[None, :] <= (
                    start + torch.arange(T, device=x_BTD.device)[:, None])
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, attn_mask=mask, is_causal=is_causal)
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
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD, cos_TK, sin_TK, cache: KVCache | None, layer: int) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TK, sin_TK, cache, layer)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class GPT(nn.Module):
    """Shared trunk + `num_future_tokens` one-block heads + shared final norm and unembedding."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int, num_future_tokens: int = 1):
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
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.d_model // cfg.num_heads, max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    @property
    def num_trunk_layers(self) -> int:
        """Blocks in the shared trunk."""
        return len(self.trunk_blocks)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (by default without the embedding, as in the 6N FLOPs estimate)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if non_embedding else total

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.max_seq_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds the model context ({self.max_seq_len})")
        return self.rope_cos[start:start + length], self.rope_sin[start:start + length]

    def trunk(self, idx_BT: torch.Tensor, cache: KVCache | None = None,
              capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Embed and run the trunk; returns its output and the residual stream after each captured block."""
        cos_TK, sin_TK = self._rope(cache.pos if cache else 0, idx_BT.shape[1])
        h_BTD = self.embed(idx_BT)
        captured = {}
        for layer, block in enumerate(self.trunk_blocks):
            h_BTD = block(h_BTD, cos_TK, sin_TK, cache, layer)
            if str(layer) in self.inserts:
                h_BTD = self.inserts[str(layer)](h_BTD)
            if layer in capture_layers:
                captured[layer] = h_BTD
        return h_BTD, captured

    def head(self, h_BTD: torch.Tensor, index: int, cache: KVCache | None = None) -> torch.Tensor:
        """Head `index` (0 = next token, i = token t+1+i) on the trunk output."""
        cos_TK, sin_TK = self._rope(cache.pos if cache else 0, h_BTD.shape[1])
        return self.head_blocks[index](h_BTD, cos_TK, sin_TK, cache, self.num_trunk_layers + index)

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Shared final norm and unembedding."""
        return self.lm_head(self.norm(h_BTD))

    def forward(self, idx_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits (head 0) of shape (B, T, V); advances the cache when one is given."""
        h_BTD, _ = self.trunk(idx_BT, cache)
        logits_BTV = self.logits(self.head(h_BTD, 0, cache))
        if cache is not None:
            cache.pos += idx_BT.shape[1]
        return logits_BTV

    def forward_heads(self, idx_BT: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head: element i predicts token t+1+i."""
        h_BTD, _ = self.trunk(idx_BT)
        return [self.logits(self.head(h_BTD, i)) for i in range(self.num_future_tokens)]


def per_token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Unreduced cross-entropy in fp32, shape (B, T); ignored positions get 0."""
    B, T, V = logits_BTV.shape
    return F.cross_entropy(logits_BTV.float().reshape(B * T, V), targets_BT.reshape(B * T),
                           ignore_index=ignore_index, reduction="none").view(B, T)


def per_token_entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the predicted next-token distribution, fp32, shape (B, T)."""
    logp_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
    return -(logp_BTV.exp() * logp_BTV).sum(-1)
