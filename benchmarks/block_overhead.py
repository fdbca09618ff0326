"""Training-step overhead of lmpipe's GPT blocks against a GPT-2-style model of the same FLOPs, and what closes it.

    python benchmarks/block_overhead.py [--quick] [--repeats 5] [--steps 3] [--batch 16] [--json-out PATH]
                                        [--no-profile] [--no-components]

Shape: the default preset (ModelConfig(num_layers=4, num_heads=4, d_model=128), vocab 4096, seq_len 128, micro
batch 16), CPU fp32. A training step = forward, mean F.cross_entropy, backward, torch.optim.AdamW step (torch's
default foreach implementation, as stages.training.optim on CPU).

1. Models (tokens/s of the training step, all in one process, round-robin inside each repeat):
   - ours:        stages.models.gpt.GPT (swiglu, mlp_ratio 8/3 -> hidden 344, RMSNorm, rotary, tied);
   - copy:        a copy of its classes below (`Variant`, all options off); its logits equal ours on ours' weights;
   - copy + X:    one change at a time (the same math: logits equal ours on ours' weights converted, checked):
       rope_fn       rotary as ours in an autograd.Function whose backward is the inverse rotation (rotary by
                     -angle) instead of autograd through slice, neg, cat, mul, add;
       rms_fn        RMSNorm in an autograd.Function with a hand-written backward (CPU has no fused RMSNorm
                     backward: nn.RMSNorm's backward is a graph of ~10 elementwise ops);
       rope_half     rotary as [x1*c - x2*s, x2*c + x1*s] on half-width tables (no negated copy, no full-width
                     muls);
       rope_half_fn  rope_half in an autograd.Function: each half written in place into one output (mul + addcmul_,
                     no cat, no negated copy), backward = the same with -sin;
       rope_complex  rotary as a complex multiply (view_as_complex on interleaved pairs: q/k projection rows
                     permuted once, the scores are unchanged; needs the permutation at HF export);
       qkv_fused     one Linear(d, 3d) for q, k, v (weight = cat of the three);
       gate_up_fused one Linear(d, 2 * hidden) for gate and up (weight = cat of the two);
       rms_manual    x * rsqrt(mean(x^2) + eps) * w written out, instead of nn.RMSNorm;
     and combinations (COMBOS);
   - gpt2:        a GPT-2-style model at the same FLOPs: GELU MLP x4 (hidden 512: 2*128*512 = 131k MACs per token
                  vs SwiGLU 3*128*344 = 132k), learned absolute positions, LayerNorm without bias, fused c_attn,
                  tied embeddings, no biases.
   - ... + losses.token_loss: the same model objects with the loss computed by stages.models.losses.token_loss
                  (chunked cross-entropy) instead of F.cross_entropy;
   ratio = tokens/s / gpt2 tokens/s (median over repeats; `ratio best` from the fastest repeat of each).
2. Components (--no-components skips): forward + backward of each block part at the real shapes, ms per call and
   per training step (x calls per step), so the per-block difference can be read off part by part.
3. Profile (--no-profile skips): torch.profiler over 2 training steps of ours and gpt2, self CPU time by op.

The machine may be shared (2 cores): each repeat first waits (up to --wait-quiet s) for the CPUs to be < 25%
busy; the busy fraction seen is in the JSON. Rerun when median and best disagree much.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scoring_throughput import cpu_busy_fraction, load_average, wait_quiet  # noqa: E402
from schemas.configs import ModelConfig  # noqa: E402
from stages.models.gpt import GPT  # noqa: E402
from stages.models.losses import token_loss  # noqa: E402

VOCAB, SEQ_LEN = 4096, 128
CFG = ModelConfig(num_layers=4, num_heads=4, d_model=128)
HIDDEN = 8 * math.ceil(CFG.mlp_ratio * CFG.d_model / 8)  # 344, as stages.models.gpt.mlp_hidden_size
OPTIONS = ("rope_fn", "rope_half", "rope_half_fn", "rope_complex", "rms_fn", "rms_manual", "qkv_fused",
           "gate_up_fused")
COMBOS = {"rope_half_fn + rms_fn": {"rope_half_fn", "rms_fn"}, "rope_complex + rms_fn": {"rope_complex", "rms_fn"},
          "rope_half_fn + rms_fn + qkv_fused + gate_up_fused": {"rope_half_fn", "rms_fn", "qkv_fused",
                                                                "gate_up_fused"}}
OURS, GPT2_NAME = "ours (stages.models.gpt)", "gpt2-style"
TOKEN_LOSS_ROWS = {f"{OURS} + losses.token_loss": OURS, f"{GPT2_NAME} + losses.token_loss": GPT2_NAME,
                   "copy + rope_half_fn + rms_fn + losses.token_loss": "copy + rope_half_fn + rms_fn"}
"""Extra rows: the same model object, loss = losses.token_loss(...).mean() instead of F.cross_entropy."""


# ---------------------------------------------------------------------------------------------------------------
# Copy of stages/models/gpt.py's Attention / MLP / Block / GPT (one next-token head, no inserts, no cache) with
# switchable implementations of the same math.

def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width cos/sin (max_len, head_dim), halves repeated, as gpt.rotary_tables."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rope_cat(x_BHTK, cos_TK, sin_TK):
    """gpt.apply_rotary: x * cos + rotate_half(x) * sin, rotate_half by negation and torch.cat."""
    half = x_BHTK.shape[-1] // 2
    rotated = torch.cat([-x_BHTK[..., half:], x_BHTK[..., :half]], dim=-1)
    return x_BHTK * cos_TK + rotated * sin_TK


class RopeFn(torch.autograd.Function):
    """rope_cat with the analytic backward: the gradient of a rotation by +angle is the rotation by -angle."""

    @staticmethod
    def forward(ctx, x_BHTK, cos_TK, sin_TK):
        ctx.save_for_backward(cos_TK, sin_TK)
        return rope_cat(x_BHTK, cos_TK, sin_TK)

    @staticmethod
    def backward(ctx, grad_BHTK):
        cos_TK, sin_TK = ctx.saved_tensors
        return rope_cat(grad_BHTK, cos_TK, -sin_TK), None, None


def rotate_into(x_BHTK, cos_TK2, sin_TK2):
    """[x1*c - x2*s, x2*c + x1*s] written into one new tensor (no negated copy, no cat): 4 half-width kernels."""
    half = x_BHTK.shape[-1] // 2
    x1, x2 = x_BHTK[..., :half], x_BHTK[..., half:]
    out = torch.empty(x_BHTK.shape, dtype=torch.promote_types(x_BHTK.dtype, cos_TK2.dtype), device=x_BHTK.device)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos_TK2, out=out1).addcmul_(x2, sin_TK2, value=-1.0)
    torch.mul(x2, cos_TK2, out=out2).addcmul_(x1, sin_TK2)
    return out


class RopeHalfFn(torch.autograd.Function):
    """rotate_into forward; backward = rotate_into by -angle (the inverse rotation)."""

    @staticmethod
    def forward(ctx, x_BHTK, cos_TK2, sin_TK2):
        ctx.save_for_backward(cos_TK2, sin_TK2)
        ctx.x_dtype = x_BHTK.dtype
        return rotate_into(x_BHTK, cos_TK2, sin_TK2)

    @staticmethod
    def backward(ctx, grad_BHTK):
        cos_TK2, sin_TK2 = ctx.saved_tensors
        return rotate_into(grad_BHTK, cos_TK2, -sin_TK2).to(ctx.x_dtype), None, None


def rope_half(x_BHTK, cos_TK2, sin_TK2):
    """The same rotation on half-width tables: [x1*c - x2*s, x2*c + x1*s]."""
    x1, x2 = x_BHTK.chunk(2, dim=-1)
    return torch.cat([x1 * cos_TK2 - x2 * sin_TK2, x2 * cos_TK2 + x1 * sin_TK2], dim=-1)


def rope_complex(x_BHTK, freqs_TK2):
    """The same rotation on interleaved pairs (2i, 2i+1) as a complex multiply (q/k rows permuted to match)."""
    x_c = torch.view_as_complex(x_BHTK.unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_c * freqs_TK2).flatten(-2)


def interleave_rows(weight_DD: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from halves (i, i + K/2) to pairs (2i, 2i + 1) (the Meta/HF Llama permute)."""
    D = weight_DD.shape[0]
    K = D // num_heads
    return weight_DD.view(num_heads, 2, K // 2, -1).transpose(1, 2).reshape(D, -1)


class RMSNormManual(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RMSNormFn(torch.autograd.Function):
    """y = x * rstd * w, rstd = rsqrt(mean(x^2) + eps), with a hand-written backward (no autograd graph):
    dx = rstd * (g*w - xhat * mean(g*w * xhat)), dw = sum over rows of g * xhat."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd
        gw = grad * weight
        dot = torch.linalg.vecdot(gw, xhat).unsqueeze(-1) / x.shape[-1]
        grad_x = torch.addcmul(gw, xhat, dot, value=-1.0).mul_(rstd)
        grad_w = (grad * xhat).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_w, None


class RMSNormAutogradFn(nn.RMSNorm):
    """nn.RMSNorm (same parameter) computed by RMSNormFn."""

    def forward(self, x):
        return RMSNormFn.apply(x, self.weight, self.eps)


def make_norm(opts: set) -> nn.Module:
    if "rms_manual" in opts:
        return RMSNormManual(CFG.d_model, CFG.norm_eps)
    return (RMSNormAutogradFn if "rms_fn" in opts else nn.RMSNorm)(CFG.d_model, eps=CFG.norm_eps)


class VariantAttention(nn.Module):
    def __init__(self, opts: set):
        super().__init__()
        self.opts, self.num_heads, D = opts, CFG.num_heads, CFG.d_model
        if "qkv_fused" in opts:
            self.qkv_proj = nn.Linear(D, 3 * D, bias=False)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x_BTD, rope):
        B, T, D = x_BTD.shape
        H = self.num_heads
        if "qkv_fused" in self.opts:
            qkv_BT3HK = self.qkv_proj(x_BTD).view(B, T, 3, H, D // H)
            q_BHTK, k_BHTK, v_BHTK = qkv_BT3HK.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            split = lambda t: t.view(B, T, H, D // H).transpose(1, 2)  # noqa: E731
            q_BHTK, k_BHTK, v_BHTK = split(self.q_proj(x_BTD)), split(self.k_proj(x_BTD)), split(self.v_proj(x_BTD))
        y_BHTK = F.scaled_dot_product_attention(rope(q_BHTK), rope(k_BHTK), v_BHTK, is_causal=True)
        return self.o_proj(y_BHTK.transpose(1, 2).reshape(B, T, D))


class VariantMLP(nn.Module):
    def __init__(self, opts: set):
        super().__init__()
        self.fused = "gate_up_fused" in opts
        if self.fused:
            self.gate_up_proj = nn.Linear(CFG.d_model, 2 * HIDDEN, bias=False)
        else:
            self.up_proj = nn.Linear(CFG.d_model, HIDDEN, bias=False)
            self.gate_proj = nn.Linear(CFG.d_model, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, CFG.d_model, bias=False)

    def forward(self, x_BTD):
        if self.fused:
            gate, up = self.gate_up_proj(x_BTD).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class VariantBlock(nn.Module):
    def __init__(self, opts: set):
        super().__init__()
        self.attn_norm, self.attn = make_norm(opts), VariantAttention(opts)
        self.mlp_norm, self.mlp = make_norm(opts), VariantMLP(opts)

    def forward(self, x_BTD, rope):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Variant(nn.Module):
    """gpt.GPT with one head and no inserts; `opts` picks implementations (see OPTIONS)."""

    def __init__(self, opts: set):
        super().__init__()
        self.opts = set(opts)
        self.embed = nn.Embedding(VOCAB, CFG.d_model)
        self.blocks = nn.ModuleList(VariantBlock(self.opts) for _ in range(CFG.num_layers))
        self.norm = make_norm(self.opts)
        self.lm_head = nn.Linear(CFG.d_model, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight
        K = CFG.d_model // CFG.num_heads
        cos, sin = rotary_tables(K, SEQ_LEN, CFG.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("cos2", cos[:, : K // 2].contiguous(), persistent=False)
        self.register_buffer("sin2", sin[:, : K // 2].contiguous(), persistent=False)
        self.register_buffer("freqs", torch.polar(torch.ones_like(self.cos2), torch.atan2(self.sin2, self.cos2)),
                             persistent=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=CFG.init_std)

    def rope(self, T: int):
        if "rope_complex" in self.opts:
            freqs = self.freqs[:T]
            return lambda x: rope_complex(x, freqs)
        if "rope_fn" in self.opts:
            cos, sin = self.cos[:T], self.sin[:T]
            return lambda x: RopeFn.apply(x, cos, sin)
        if "rope_half_fn" in self.opts:
            cos, sin = self.cos2[:T], self.sin2[:T]
            return lambda x: RopeHalfFn.apply(x, cos, sin)
        if "rope_half" in self.opts:
            cos, sin = self.cos2[:T], self.sin2[:T]
            return lambda x: rope_half(x, cos, sin)
        cos, sin = self.cos[:T], self.sin[:T]
        return lambda x: rope_cat(x, cos, sin)

    def forward(self, idx_BT):
        rope = self.rope(idx_BT.shape[1])
        h_BTD = self.embed(idx_BT)
        for block in self.blocks:
            h_BTD = block(h_BTD, rope)
        return self.lm_head(self.norm(h_BTD))

    @torch.no_grad()
    def load_from(self, ours: nn.Module) -> "Variant":
        """Take ours' weights, converted to this variant's layout (fusions concatenated, rows permuted)."""
        state = {}
        for name, value in ours.state_dict().items():
            name = name.replace("head_blocks.0.", f"blocks.{CFG.num_layers - 1}.").replace("trunk_blocks.", "blocks.")
            if "rope_complex" in self.opts and name.endswith(("q_proj.weight", "k_proj.weight")):
                value = interleave_rows(value, CFG.num_heads)
            state[name] = value
        for i in range(CFG.num_layers):
            p = f"blocks.{i}."
            if "qkv_fused" in self.opts:
                state[p + "attn.qkv_proj.weight"] = torch.cat([state.pop(p + f"attn.{n}_proj.weight") for n in "qkv"])
            if "gate_up_fused" in self.opts:
                state[p + "mlp.gate_up_proj.weight"] = torch.cat([state.pop(p + "mlp.gate_proj.weight"),
                                                                  state.pop(p + "mlp.up_proj.weight")])
        self.load_state_dict(state)
        return self


# ---------------------------------------------------------------------------------------------------------------
# GPT-2-style baseline at the same FLOPs.

class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        D, self.num_heads = CFG.d_model, CFG.num_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def forward(self, x_BTD):
        B, T, D = x_BTD.shape
        q, k, v = self.c_attn(self.ln_1(x_BTD)).view(B, T, 3, self.num_heads, D // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        y_BHTK = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BTD = x_BTD + self.c_proj(y_BHTK.transpose(1, 2).reshape(B, T, D))
        return x_BTD + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x_BTD))))


class GPT2(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, CFG.d_model), nn.Embedding(SEQ_LEN, CFG.d_model)
        self.blocks = nn.ModuleList(GPT2Block() for _ in range(CFG.num_layers))
        self.ln_f = nn.LayerNorm(CFG.d_model, bias=False)
        self.lm_head = nn.Linear(CFG.d_model, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=CFG.init_std)

    def forward(self, idx_BT):
        h_BTD = self.wte(idx_BT) + self.wpe.weight[: idx_BT.shape[1]]
        for block in self.blocks:
            h_BTD = block(h_BTD)
        return self.lm_head(self.ln_f(h_BTD))


def matmul_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token of every Linear (tied unembedding included), attention scores excluded."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------------------------------------------
# Measurements.

def build_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    ours = GPT(CFG, VOCAB, SEQ_LEN)
    models = {OURS: ours, "copy": Variant(set()).load_from(ours)}
    for opt in OPTIONS:
        models[f"copy + {opt}"] = Variant({opt}).load_from(ours)
    for name, opts in COMBOS.items():
        models[f"copy + {name}"] = Variant(opts).load_from(ours)
    models[GPT2_NAME] = GPT2()
    return models


def check_same_math(models: dict[str, nn.Module], idx_BT: torch.Tensor) -> dict[str, float]:
    """Max abs logit difference of each copy from ours (on ours' converted weights)."""
    ours = models[OURS]
    with torch.no_grad():
        ref = ours(idx_BT)
        return {name: float((model(idx_BT) - ref).abs().max()) for name, model in models.items()
                if name.startswith("copy")}


def train_step_fn(model: nn.Module, idx_BT: torch.Tensor, targets_BT: torch.Tensor, chunked_loss: bool = False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        logits_BTV = model(idx_BT)
        if chunked_loss:
            loss = token_loss(logits_BTV, targets_BT).mean()
        else:
            loss = F.cross_entropy(logits_BTV.reshape(-1, VOCAB), targets_BT.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure_models(models, batch: int, repeats: int, steps: int, warmup: int, quiet_s: float) -> tuple[dict, list]:
    tokens = torch.randint(0, VOCAB, (batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    idx_BT, targets_BT = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    steps_fns = {}
    for name, model in models.items():
        model.train()
        steps_fns[name] = train_step_fn(model, idx_BT, targets_BT)
    for name, base_name in TOKEN_LOSS_ROWS.items():
        steps_fns[name] = train_step_fn(models[base_name], idx_BT, targets_BT, chunked_loss=True)
    for step in steps_fns.values():
        for _ in range(warmup):
            step()
    seconds = {name: [] for name in steps_fns}
    busy = []
    for _ in range(repeats):
        if quiet_s > 0:
            busy.append(round(wait_quiet(quiet_s), 3))
        for name, step in steps_fns.items():
            started = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[name].append((time.perf_counter() - started) / steps)
    rows = {}
    for name, values in seconds.items():
        rows[name] = {"tokens_per_s": batch * SEQ_LEN / statistics.median(values),
                      "tokens_per_s_best": batch * SEQ_LEN / min(values),
                      "ms_per_step": 1e3 * statistics.median(values), "ms_per_step_best": 1e3 * min(values),
                      "linear_macs_per_token": matmul_macs_per_token(models[TOKEN_LOSS_ROWS.get(name, name)])}
    for row in rows.values():
        row["ratio_vs_gpt2"] = row["tokens_per_s"] / rows[GPT2_NAME]["tokens_per_s"]
        row["ratio_best_vs_gpt2"] = row["tokens_per_s_best"] / rows[GPT2_NAME]["tokens_per_s_best"]
        row["ratio_vs_ours"] = row["tokens_per_s"] / rows[OURS]["tokens_per_s"]
    return rows, busy


def time_fwd_bwd(fn, inputs: list[torch.Tensor], calls: int, repeats: int) -> float:
    """Median ms of forward + backward (random output gradients) of fn(*inputs) (a tensor or a tuple)."""
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    grads = [torch.randn_like(out) for out in as_tuple(fn(*inputs))]

    def once():
        for x in inputs:
            x.grad = None
        torch.autograd.backward(as_tuple(fn(*inputs)), grads)
    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            once()
        times.append((time.perf_counter() - started) / calls)
    return 1e3 * statistics.median(times)


def measure_components(batch: int, repeats: int, quiet_s: float) -> dict:
    """Forward + backward ms of each block part at the training shapes; `per_step` = ms x calls per step."""
    torch.manual_seed(0)
    B, T, D, H = batch, SEQ_LEN, CFG.d_model, CFG.num_heads
    K, L = D // H, CFG.num_layers
    x_BTD = torch.randn(B, T, D, requires_grad=True)
    q_BHTK = torch.randn(B, T, H, K).transpose(1, 2).requires_grad_()  # the strides of split(q_proj(x))
    k_BHTK, v_BHTK = (torch.randn(B, T, H, K).transpose(1, 2).requires_grad_() for _ in range(2))
    q_contig = torch.randn(B, H, T, K, requires_grad=True)
    cos, sin = rotary_tables(K, T, CFG.rope_theta)
    cos2, sin2 = cos[:, : K // 2].contiguous(), sin[:, : K // 2].contiguous()
    freqs = torch.polar(torch.ones_like(cos2), torch.atan2(sin2, cos2))
    rms, rms_manual, ln = nn.RMSNorm(D, eps=CFG.norm_eps), RMSNormManual(D, CFG.norm_eps), nn.LayerNorm(D, bias=False)
    rms_fn = RMSNormAutogradFn(D, eps=CFG.norm_eps)
    q, k, v = (nn.Linear(D, D, bias=False) for _ in range(3))
    qkv = nn.Linear(D, 3 * D, bias=False)
    swiglu, swiglu_fused = VariantMLP(set()), VariantMLP({"gate_up_fused"})
    gelu_up, gelu_down = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)
    norms_per_step = 2 * L + 1
    parts = {
        # name: (fn, inputs, calls per training step)
        "norm: nn.RMSNorm": (rms, [x_BTD], norms_per_step),
        "norm: manual rms": (rms_manual, [x_BTD], norms_per_step),
        "norm: RMSNormFn (hand-written backward)": (rms_fn, [x_BTD], norms_per_step),
        "norm: nn.LayerNorm (gpt2)": (ln, [x_BTD], norms_per_step),
        "rotary: cat (ours), q or k": (lambda t: rope_cat(t, cos, sin), [q_BHTK], 2 * L),
        "rotary: RopeFn (analytic backward), q or k": (lambda t: RopeFn.apply(t, cos, sin), [q_BHTK], 2 * L),
        "rotary: half tables, q or k": (lambda t: rope_half(t, cos2, sin2), [q_BHTK], 2 * L),
        "rotary: RopeHalfFn (out=, analytic backward)": (lambda t: RopeHalfFn.apply(t, cos2, sin2), [q_BHTK], 2 * L),
        "rotary: complex, q or k": (lambda t: rope_complex(t, freqs), [q_BHTK], 2 * L),
        "rotary: cat on contiguous q": (lambda t: rope_cat(t, cos, sin), [q_contig], 2 * L),
        "qkv: 3 x Linear(d, d) (ours)": (lambda t: (q(t), k(t), v(t)), [x_BTD], L),
        "qkv: Linear(d, 3d) + split": (lambda t: qkv(t).chunk(3, -1), [x_BTD], L),
        "mlp: swiglu 3 Linear (ours)": (swiglu, [x_BTD], L),
        "mlp: swiglu gate_up fused": (swiglu_fused, [x_BTD], L),
        "mlp: gelu x4 (gpt2)": (lambda t: gelu_down(F.gelu(gelu_up(t))), [x_BTD], L),
        "sdpa causal (q, k, v views)": (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                        [q_BHTK, k_BHTK, v_BHTK], L),
    }
    rows = {}
    for name, (fn, inputs, per_step) in parts.items():
        if quiet_s > 0:
            wait_quiet(quiet_s)
        ms = time_fwd_bwd(fn, inputs, calls=10, repeats=repeats)
        rows[name] = {"ms_fwd_bwd": ms, "calls_per_step": per_step, "ms_per_step": ms * per_step}
    return rows


def profile_models(models: dict[str, nn.Module], batch: int, names: tuple[str, ...], quiet_s: float,
                   top: int = 18) -> dict:
    """Self CPU ms per training step by op (top `top`) of the named models."""
    tokens = torch.randint(0, VOCAB, (batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    idx_BT, targets_BT = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    result = {}
    for name in names:
        step = train_step_fn(models[name], idx_BT, targets_BT)
        step()
        if quiet_s > 0:
            wait_quiet(quiet_s)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 2e3
        result[name] = {"total_self_ms_per_step": total,
                        "ops": {e.key: {"self_ms_per_step": e.self_cpu_time_total / 2e3, "calls_per_step": e.count // 2}
                                for e in events[:top]}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats x 1 step, 1 warmup, short components")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                        help="before each repeat wait up to this long for the CPUs to be < 25%% busy (0: never)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-components", action="store_true")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 1, 1
    busy_before, load_before = cpu_busy_fraction(), load_average()
    models = build_models()
    idx_BT = torch.randint(0, VOCAB, (2, SEQ_LEN))
    same_math = check_same_math(models, idx_BT)
    rows, busy = measure_models(models, args.batch, args.repeats, args.steps, args.warmup, args.wait_quiet)
    components = {} if args.no_components else measure_components(args.batch, 3 if args.quick else 7,
                                                                    args.wait_quiet)
    profile = {} if args.no_profile else profile_models(models, args.batch, (OURS, GPT2_NAME), args.wait_quiet)
    result = {
        "config": {**CFG.model_dump(), "mlp_hidden": HIDDEN, "vocab_size": VOCAB, "seq_len": SEQ_LEN,
                   "batch": args.batch, "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu"},
        "cpu_busy_before": round(busy_before, 3), "cpu_busy_before_each_repeat": busy,
        "load_before": load_before, "load_after": load_average(),
        "max_abs_logit_diff_vs_ours": same_math, "models": rows, "components": components, "profile": profile,
    }
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(f"\nTraining step (fwd + bwd + AdamW), {args.batch} x {SEQ_LEN} tokens, {args.repeats} repeats x "
          f"{args.steps} steps, {torch.get_num_threads()} threads\n")
    print("| model | tokens/s (median) | best tokens/s | ms/step | ratio vs gpt2 | ratio best vs gpt2 | vs ours "
          "| Linear MACs/token | max logit diff vs ours |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        diff = same_math.get(name)
        print(f"| {name} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s_best']:,.0f} | {row['ms_per_step']:.1f} "
              f"| {row['ratio_vs_gpt2']:.3f} | {row['ratio_best_vs_gpt2']:.3f} | {row['ratio_vs_ours']:.3f} "
              f"| {row['linear_macs_per_token']:,} | {'' if diff is None else f'{diff:.1e}'} |")
    if components:
        print("\n| block part (fwd + bwd) | ms per call | calls per step | ms per step |\n|---|---:|---:|---:|")
        for name, row in components.items():
            print(f"| {name} | {row['ms_fwd_bwd']:.3f} | {row['calls_per_step']} | {row['ms_per_step']:.2f} |")
    for name, prof in profile.items():
        print(f"\nProfile of {name}: self CPU {prof['total_self_ms_per_step']:.1f} ms per step\n")
        print("| op | self ms per step | calls per step |\n|---|---:|---:|")
        for op, row in prof["ops"].items():
            print(f"| {op} | {row['self_ms_per_step']:.2f} | {row['calls_per_step']} |")


if __name__ == "__main__":
    main()
