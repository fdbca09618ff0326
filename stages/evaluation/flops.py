"""Training FLOPs per token of a saved model, from its model.json (GPT build_spec): the compute ledger.

Forward FLOPs per token (matmuls only, 2 per multiply-add; PaLM's accounting, attention not halved for
causality):
- a block: 2 * (4 d^2 + MLP matrices) per position, plus attention scores and values 2 * 2 * context * d;
- a block after an interleaving insert runs 2 positions per token over a context twice as long;
- every head's unembedding 2 * d * V; a concept insert 2 * d * L (prediction) + 2 * k * d (sparse compression);
training = 3 x forward (backward = 2 x forward). A distillation teacher adds its forward pass per token.
"""

import math

from schemas.configs import ModelConfig


def mlp_matrix_params(cfg: ModelConfig) -> int:
    """Weights of one MLP (SwiGLU: gate, up, down; GELU: up, down)."""
    hidden = 8 * math.ceil(cfg.mlp_ratio * cfg.d_model / 8)
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * hidden


def forward_flops_per_token(spec: dict) -> float:
    """Forward FLOPs per token of the model a model.json describes (at its full context)."""
    cfg = ModelConfig.model_validate(spec["model"])
    d, seq_len, vocab = cfg.d_model, int(spec["seq_len"]), int(spec["vocab_size"])
    heads = int(spec.get("num_future_tokens", 1))
    inserts = {int(layer): insert for layer, insert in spec.get("inserts", {}).items()}
    block_params = 4 * d * d + mlp_matrix_params(cfg)
    slots, total = 1, 0.0
    trunk = cfg.num_layers - heads
    for layer in range(cfg.num_layers):
        total += slots * (2 * block_params + 4 * slots * seq_len * d)
        insert = inserts.get(layer) if layer < trunk else None
        if insert is not None and insert["kind"] == "concepts":
            total += 2 * d * insert["num_latents"] + 2 * insert["num_active"] * d
        if insert is not None and (insert["kind"] == "pause" or insert.get("mixing") == "interleave"):
            slots = 2
    return total + heads * 2 * d * vocab


def training_flops_per_token(spec: dict, teacher_spec: dict | None = None) -> float:
    """3 x forward, plus the teacher's forward when distilling."""
    return 3 * forward_flops_per_token(spec) + (forward_flops_per_token(teacher_spec) if teacher_spec else 0.0)


def compute_rows(curves: dict[str, tuple], flops_per_token: dict[str, float], params: dict[str, int],
                 baseline: str) -> list[dict]:
    """Per model: FLOPs per token, total training FLOPs, val loss at the baseline's total FLOPs, and the FLOPs
    to reach the baseline's final val loss (and that over the baseline's own). `curves`: name -> (tokens_seen,
    val loss)."""
    from stages.evaluation.curves import first_reach, value_at

    base_tokens, base_loss = curves[baseline]
    base_flops = float(base_tokens[-1]) * flops_per_token[baseline] if len(base_tokens) else None
    level = float(base_loss[-1]) if len(base_loss) else None
    base_reach = first_reach(base_tokens, base_loss, level) if level is not None else None
    rows = []
    for name, (tokens_seen, loss) in curves.items():
        fpt = flops_per_token[name]
        flops = tokens_seen.astype(float) * fpt
        reached = first_reach(flops, loss, level) if level is not None and len(loss) else None
        rows.append({
            "model": name, "num_params": params[name], "train_flops_per_token": fpt,
            "train_flops": float(flops[-1]) if len(flops) else None,
            "val_loss_at_baseline_flops": value_at(flops, loss, base_flops) if base_flops else None,
            "flops_to_baseline_val": reached,
            "flops_ratio_to_baseline_val": reached / (base_reach * flops_per_token[baseline])
            if reached is not None and base_reach else None,
        })
    return rows
