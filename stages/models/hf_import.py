"""A Hugging Face `LlamaForCausalLM` checkpoint directory as an lmpipe GPT, with exact logits (the reverse of
stages/inference/export_hf.py).

Our blocks are Llama decoder layers (see export_hf's docstring): layers 0..L-2 become the trunk, layer L-1 head 0,
with the same names and shapes; HF's rotary already pairs (i, i + K/2) as ours does (the Meta -> HF conversion
permuted q/k rows into that layout), so no weight is permuted. Grouped-query checkpoints keep their key/value heads
(model.num_kv_heads); `intermediate_size` is kept exactly (model.mlp_hidden); Llama 3.1/3.2's `llama3` rotary
scaling becomes model.rope_scaling (other scalings are refused).

Memory: the model is built on the meta device, allocated once in its dtype, and the safetensors are streamed into
it tensor by tensor (one shard open at a time, one tensor materialised at a time, cast on copy): peak is the model
plus its largest tensor, never two copies. Every check (config, files, tensor names and shapes, read from the
safetensors headers) runs before a weight is read; each failure is a one-line ValueError naming the file and the fix.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn

from schemas.configs import Llama3RopeScaling, ModelConfig
from stages.models.gpt import GPT, Block, rotary_tables

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
_SKIPPED = re.compile(r"rotary_emb\.inv_freq$")
"""Tensors older checkpoints saved that carry no weights (the rotary table is recomputed)."""


def layer_parameters(block: Block, prefix: str) -> dict[str, nn.Parameter]:
    """One block's parameters under the names of a Llama decoder layer at `prefix`."""
    params = {f"{prefix}.input_layernorm.weight": block.attn_norm.weight,
              f"{prefix}.post_attention_layernorm.weight": block.mlp_norm.weight}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        params[f"{prefix}.self_attn.{name}.weight"] = getattr(block.attn, name).weight
    for name in ("gate_proj", "up_proj", "down_proj"):
        params[f"{prefix}.mlp.{name}.weight"] = getattr(block.mlp, name).weight
    return params


def llama_parameters(model: GPT) -> dict[str, nn.Parameter]:
    """The model's parameters under Llama names: the trunk blocks, then head 0 as the last layer; `lm_head.weight`
    only when the embeddings are untied (extra multi-token heads and inserts have no Llama name)."""
    params = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate([*model.trunk_blocks, model.head_blocks[0]]):
        params |= layer_parameters(block, f"model.layers.{i}")
    if not model.cfg.tie_embeddings:
        params["lm_head.weight"] = model.lm_head.weight
    return params


@dataclass(frozen=True)
class LlamaCheckpoint:
    """A checked Llama checkpoint directory: the lmpipe shape it becomes and where each tensor lives."""

    directory: Path
    model: ModelConfig
    """num_layers is the checkpoint's layer count (one next-token head)."""
    vocab_size: int
    max_seq_len: int
    """max_position_embeddings."""
    weight_files: dict[str, Path]
    """tensor name -> safetensors file holding it."""


def _rope(config: dict, path: Path) -> tuple[float, Llama3RopeScaling | None]:
    """rope_theta and the frequency scaling from either layout (transformers 5 `rope_parameters`, 4.x top-level
    `rope_theta` and `rope_scaling`): plain rotary or Llama 3.1's `llama3` scaling."""
    layouts = [config.get("rope_parameters") or {}, config.get("rope_scaling") or {}]
    rope = next((r for r in layouts if r.get("rope_type", r.get("type", "default")) != "default"), layouts[0])
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(layouts[0].get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{path}: rope scaling {kind!r} is not supported (plain rotary and 'llama3' are); "
                         "use a checkpoint with either")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    try:
        return theta, Llama3RopeScaling(**{name: rope[name] for name in fields if name in rope})
    except ValidationError as err:
        raise ValueError(f"{path}: llama3 rope scaling: {err.errors()[0]['loc'][0]} "
                         f"{err.errors()[0]['msg'].lower()}; give the checkpoint's complete rope scaling "
                         f"({', '.join(fields)})") from None


def llama_model_config(config: dict, path: Path) -> tuple[ModelConfig, int, int]:
    """(model shape, vocab size, max positions) of a LlamaForCausalLM config.json's contents."""
    arch = config.get("architectures") or [f"model_type {config.get('model_type')!r}"]
    if "LlamaForCausalLM" not in arch and config.get("model_type") != "llama":
        raise ValueError(f"{path}: {'/'.join(arch)} is not LlamaForCausalLM; only Llama-family checkpoints "
                         "become trainable lmpipe models (use another as a frozen model role)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{path}: {flag} is true; lmpipe's Llama blocks have no biases (use it as a frozen "
                             "model role)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {config['hidden_act']!r}; lmpipe's SwiGLU MLP needs 'silu'")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if config.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise ValueError(f"{path}: head_dim {config.get('head_dim')} is not hidden_size / num_attention_heads "
                         f"({hidden} / {heads}); lmpipe needs heads * head_dim == hidden_size")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    theta, scaling = _rope(config, path)
    intermediate = int(config["intermediate_size"])
    try:
        model = ModelConfig(num_layers=int(config["num_hidden_layers"]), num_heads=heads,
                            num_kv_heads=None if kv_heads == heads else kv_heads, d_model=hidden, mlp="swiglu",
                            mlp_ratio=intermediate / hidden, mlp_hidden=intermediate,
                            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                            rope_theta=theta, rope_scaling=scaling, norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                            init_std=float(config.get("initializer_range", 0.02)))
    except ValidationError as err:
        raise ValueError(f"{path}: not an lmpipe shape: {err.errors()[0]['msg']}") from None
    return model, int(config["vocab_size"]), int(config.get("max_position_embeddings", 2048))


def weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, from the shard index or the single safetensors file's header."""
    index = directory / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).exists():
                raise ValueError(f"{directory / shard}: shard listed in {index.name} is missing; copy the complete "
                                 "checkpoint (every shard the index names)")
        return {name: directory / shard for name, shard in weight_map.items()}
    if (directory / WEIGHTS).exists():
        with safe_open(directory / WEIGHTS, "pt") as f:
            return dict.fromkeys(f.keys(), directory / WEIGHTS)
    raise ValueError(f"{directory}: no {WEIGHTS} or {INDEX}; save the model with "
                     "save_pretrained(..., safe_serialization=True) (lmpipe reads safetensors only)")


def read_llama_checkpoint(directory: str | Path) -> LlamaCheckpoint:
    """Check a checkpoint directory (config.json + safetensors, single or sharded) without reading a weight."""
    directory = Path(directory)
    path = directory / CONFIG
    if not path.exists():
        raise ValueError(f"{path}: missing; a Hugging Face checkpoint directory needs config.json "
                         "(save it with save_pretrained)")
    model, vocab_size, max_seq_len = llama_model_config(json.loads(path.read_text()), path)
    return LlamaCheckpoint(directory, model, vocab_size, max_seq_len, weight_files(directory))


def check_tensors(targets: dict[str, nn.Parameter], checkpoint: LlamaCheckpoint) -> None:
    """Every target tensor is in the checkpoint with its shape, and the checkpoint holds nothing else."""
    files = checkpoint.weight_files
    missing = sorted(set(targets) - set(files))
    if missing:
        raise ValueError(f"{checkpoint.directory}: tensor {missing[0]} (and {len(missing) - 1} more) not in the "
                         "checkpoint; the model's shape does not match it (build it from read_llama_checkpoint)")
    extra = sorted(n for n in set(files) - set(targets) if not _SKIPPED.search(n) and n != "lm_head.weight")
    if extra:
        raise ValueError(f"{files[extra[0]]}: tensor {extra[0]} has no place in the model (more layers than the "
                         "model's?); build the model from read_llama_checkpoint")
    for file in sorted(set(files[name] for name in targets)):
        with safe_open(file, "pt") as f:
            for name in (n for n in targets if files[n] == file):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(targets[name].shape):
                    raise ValueError(f"{file}: tensor {name} has shape {list(shape)}, the model expects "
                                     f"{list(targets[name].shape)}; build the model from read_llama_checkpoint")


def init_heads_from_last_block(model: GPT) -> None:
    """Start every extra multi-token head (head_blocks[1:]) as a copy of head 0, the checkpoint's last layer."""
    with torch.no_grad():
        for block in model.head_blocks[1:]:
            for target, source in zip(block.parameters(), model.head_blocks[0].parameters(), strict=True):
                target.copy_(source)


@torch.no_grad()
def load_llama_weights(model: GPT, checkpoint: LlamaCheckpoint | str | Path) -> None:
    """Stream a checkpoint's weights into `model` (trunk + head 0 = the Llama layers), cast to each parameter's
    dtype; extra multi-token heads start as copies of the last layer; inserts keep their own initialisation."""
    if not isinstance(checkpoint, LlamaCheckpoint):
        checkpoint = read_llama_checkpoint(checkpoint)
    targets = llama_parameters(model)
    check_tensors(targets, checkpoint)
    for file in sorted(set(checkpoint.weight_files[name] for name in targets)):
        with safe_open(file, "pt", device="cpu") as f:
            for name in (n for n in targets if checkpoint.weight_files[n] == file):
                targets[name].copy_(f.get_tensor(name))
    init_heads_from_last_block(model)


def import_llama(directory: str | Path, *, max_seq_len: int | None = None, num_future_tokens: int = 1,
                 dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT holding a Llama checkpoint's weights (on the CPU, in `dtype`). `max_seq_len`: the context (default the
    checkpoint's max_position_embeddings); `num_future_tokens` > 1 adds heads after the last layer, copies of it."""
    checkpoint = read_llama_checkpoint(directory)
    cfg = checkpoint.model
    if num_future_tokens > 1:  # the Llama layers stay trunk + head 0; each extra head is one more block
        cfg = cfg.model_copy(update={"num_layers": cfg.num_layers + num_future_tokens - 1})
    with torch.device("meta"):  # no weights allocated or drawn yet
        model = GPT(cfg, checkpoint.vocab_size, max_seq_len or checkpoint.max_seq_len, num_future_tokens).to(dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = None  # to_empty would allocate the tied matrix twice
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    # non-persistent buffers: not in the file
    cos, sin = rotary_tables(cfg.head_dim, model.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    load_llama_weights(model, checkpoint)
    return model.eval()
