"""Training FLOPs per token of a saved model, from its model.json (GPT build_spec): the compute ledger.

Forward FLOPs per token (matmuls only, 2 per multiply-add; PaLM's accounting, attention not halved for
causality):
- a block: 2 * (4 d^2 + MLP matrices) per position (with grouped-query attention 2 d^2 + 2 d * kv_heads *
  head_dim instead of 4 d^2), plus attention scores and values 2 * 2 * context * d;
- a block after an interleaving insert runs 2 positions per token over a context twice as long;
- every head's unembedding 2 * d * V; a concept insert 2 * d * L (prediction) + 2 * k * d (sparse compression);
training = 3 x forward (backward = 2 x forward). A distillation teacher adds its forward pass per token.

Upstream cost (paid once, shared by every variant that uses it): the reference's training (3 x forward per token
seen) and scoring (one forward per scored token) for selection; the teacher's training for concepts and
distillation; the SAE (a teacher forward per activation row plus 3 x the encoder's dense 2 d L and the decoder's
sparse 2 k d); concept extraction (a teacher forward and backward, 3 x forward, plus the SAE encoder, per labelled
token). Multi-token models pay one unembedding (2 d V) per head: mtp2's FLOPs/token are its real cost, not its
block count's.
"""

from schemas.configs import ModelConfig
from stages.models.gpt import mlp_hidden_size


def mlp_matrix_params(cfg: ModelConfig) -> int:
    """Weights of one MLP (SwiGLU: gate, up, down; GELU: up, down)."""
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * mlp_hidden_size(cfg)


def forward_flops_per_token(spec: dict) -> float:
    """Forward FLOPs per token of the model a model.json describes (at its full context)."""
    cfg = ModelConfig.model_validate(spec["model"])
    d, seq_len, vocab = cfg.d_model, int(spec["seq_len"]), int(spec["vocab_size"])
    heads = int(spec.get("num_future_tokens", 1))
    inserts = {int(layer): insert for layer, insert in spec.get("inserts", {}).items()}
    block_params = 2 * d * d + 2 * d * cfg.kv_heads * cfg.head_dim + mlp_matrix_params(cfg)  # q, o; k, v (GQA)
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


def upstream_flops(roles: set[str], reference: dict | None, scored_tokens: int = 0, sae: dict | None = None,
                   labelled_tokens: int = 0, teacher: dict | None = None) -> float:
    """One-off FLOPs of the upstream artifacts a target depends on, from its upstream roles (`scores`, `concepts`,
    `teacher`). `reference` (scoring's model) and `teacher` (the concept source and distillation teacher; None:
    the reference plays both parts): {"spec": model.json, "tokens_seen": int}; `sae`: train_sae summary (rows,
    num_latents, k). Each model's training is counted once, with what is run through it."""
    total = 0.0
    if reference is not None and "scores" in roles:
        total += (3 * float(reference["tokens_seen"]) + scored_tokens) * forward_flops_per_token(reference["spec"])
    source = teacher if teacher is not None else reference
    if source is None or not roles & {"concepts", "teacher"}:
        return total
    forward = forward_flops_per_token(source["spec"])
    d = int(source["spec"]["model"]["d_model"])
    if source is not reference or "scores" not in roles:
        total += 3 * forward * float(source["tokens_seen"])
    if "concepts" in roles and sae is not None:
        encoder, decoder = 2 * d * int(sae["num_latents"]), 2 * int(sae["k"]) * d
        total += float(sae["rows"]) * (forward + 3 * (encoder + decoder))
        total += labelled_tokens * (3 * forward + encoder)
    return total


def compute_rows(curves: dict[str, tuple], flops_per_token: dict[str, float], params: dict[str, int],
                 baseline_models: list[str], upstream: dict[str, float] | None = None) -> list[dict]:
    """Per model: FLOPs per token, total training FLOPs, val loss at the baseline's mean total FLOPs, and the
    FLOPs to reach the baseline's mean final val loss (and that over the baseline's mean total), without and with
    the model's upstream FLOPs. `curves`: name -> (tokens_seen, val loss); `baseline_models`: the baseline
    variant's seed runs."""
    from stages.evaluation.curves import baseline_level, first_reach, value_at

    flops_curves = {name: (tokens.astype(float) * flops_per_token[name], loss)
                    for name, (tokens, loss) in curves.items()}
    level, base_flops = baseline_level(flops_curves, baseline_models)
    upstream = upstream or {}
    rows = []
    for name, (flops, loss) in flops_curves.items():
        reached = first_reach(flops, loss, level) if level is not None and len(loss) else None
        extra = float(upstream.get(name, 0.0))
        rows.append({
            "model": name, "num_params": params[name], "train_flops_per_token": flops_per_token[name],
            "train_flops": float(flops[-1]) if len(flops) else None,
            "val_loss_at_baseline_flops": value_at(flops, loss, base_flops) if base_flops else None,
            "flops_to_baseline_val": reached,
            "flops_ratio_to_baseline_val": reached / base_flops if reached is not None and base_flops else None,
            "upstream_flops": extra,
            "flops_to_baseline_val_with_upstream": reached + extra if reached is not None else None,
            "flops_ratio_with_upstream": (reached + extra) / base_flops
            if reached is not None and base_flops else None,
        })
    return rows
