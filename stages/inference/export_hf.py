"""Export a trained GPT as a stock Hugging Face `LlamaForCausalLM` folder.

Writes into `out_dir`:
- `config.json`: a `LlamaConfig` made by the installed transformers (model_type llama, `rope_parameters`
  as transformers 5 reads it, plain or llama3-scaled, plus top-level `rope_theta` and `rope_scaling` for
  transformers 4.x readers, dtype float32);
- `model.safetensors`: fp32 weights under Llama names (`model.embed_tokens.weight`,
  `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
  `model.layers.{i}.input_layernorm.weight`, `model.layers.{i}.post_attention_layernorm.weight`,
  `model.norm.weight`, and `lm_head.weight` unless the embeddings are tied; the names come from
  stages.models.hf_import, which reads such a folder back);
- `generation_config.json`: bos/eos/pad ids;
- `tokenizer.json` + `tokenizer_config.json`: the tokenizer as a `PreTrainedTokenizerFast`;
- `README.md`: a short model card.

Why the mapping is exact: our blocks are Llama blocks (grouped-query ones too: num_key_value_heads, query head
h reading key/value head h // group as Llama's repeat_kv). Rotary uses the rotate-half pairing (i, i + K/2) with
inv_freq = theta^(-2i/K) like `LlamaRotaryEmbedding`; attention is causal SDPA with scale K^-0.5 and no
biases; the MLP is down(silu(gate(x)) * up(x)); `nn.RMSNorm` on fp32 activations computes
weight * x * rsqrt(mean(x^2) + eps) exactly as `LlamaRMSNorm` (which upcasts to fp32 first, a no-op in fp32).
Layer order is trunk_blocks followed by head_blocks[0]; the extra multi-token heads (head_blocks[1:]) have
no place in a Llama model: they are written beside it as `mtp_heads.safetensors` (Llama layer names under
`extra_heads.{j}` for head j + 2, applied to the hidden state entering the last layer, then `model.norm` and
`lm_head`), with a warning. GELU MLPs and concept-mixing inserts cannot be
expressed as Llama and raise ValueError.
"""

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from schemas.configs import ModelConfig
from stages.corpus.tokenizers import EOT
from stages.models.gpt import GPT, mlp_hidden_size
from stages.models.hf_import import layer_parameters, llama_parameters

logger = logging.getLogger(__name__)

EXTRA_HEADS = "mtp_heads.safetensors"
EXTRA_HEADS_USAGE = ("extra_heads.{j} is a Llama decoder layer predicting token t+2+j: apply it to the hidden state "
                     "entering the last layer (output_hidden_states[-2]), then model.norm and lm_head")


def llama_config_dict(model: GPT, bos_id: int | None, eos_id: int | None) -> dict:
    """The config.json contents of the Llama equivalent of `model` (validated by the installed LlamaConfig)."""
    from transformers import LlamaConfig

    cfg = model.cfg
    llama_cfg = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=mlp_hidden_size(cfg),
        num_hidden_layers=model.num_trunk_layers + 1,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=model.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        dtype=torch.float32,
        architectures=["LlamaForCausalLM"],
    )
    config = llama_cfg.to_dict()
    config["rope_theta"] = float(cfg.rope_theta)  # transformers 4.x reads this key, 5.x reads rope_parameters
    if cfg.rope_scaling is not None:
        config["rope_scaling"] = cfg.rope_scaling.model_dump()  # and this one
    return config


def _rope_parameters(cfg: ModelConfig) -> dict:
    """transformers 5's rope_parameters: plain rotary, or the model's llama3 frequency scaling."""
    scaling = {} if cfg.rope_scaling is None else cfg.rope_scaling.model_dump()
    return {"rope_type": "default", **scaling, "rope_theta": float(cfg.rope_theta)}


def _standalone(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32, contiguous, each tensor its own storage (safetensors needs that)."""
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in weights.items()}


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Llama names: the trunk blocks, then head 1 as the last layer."""
    return _standalone(llama_parameters(model))


def extra_heads_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The multi-token heads 2..n as Llama decoder layers `extra_heads.{j}` (head j + 2)."""
    weights = {}
    for j, block in enumerate(model.head_blocks[1:]):
        weights |= layer_parameters(block, f"extra_heads.{j}")
    return _standalone(weights)


def check_exportable(model: GPT) -> None:
    """Raise ValueError when `model` has parts a stock Llama cannot express; warn about dropped MTP heads."""
    if model.cfg.mlp != "swiglu":
        raise ValueError(f"model.mlp={model.cfg.mlp!r}: only SwiGLU models can be exported as Llama "
                         "(Llama has no GELU MLP)")
    if len(model.inserts):
        kinds = sorted({spec["kind"] for spec in model.insert_specs.values()})
        raise ValueError(f"this model has {'/'.join(kinds)} inserts after blocks {sorted(model.insert_specs)} "
                         "(CoCoMix concept mixing or pause slots), which a stock Hugging Face Llama cannot express; "
                         "export a model without inserts (e.g. ntp or slm), or use it with `lmpipe generate`")
    if model.num_future_tokens > 1:
        logger.warning("%d extra multi-token prediction heads have no place in a Llama model: they are saved "
                       "beside it in %s", model.num_future_tokens - 1, EXTRA_HEADS)


def model_card(model: GPT, config: dict) -> str:
    """A short README.md describing the exported model."""
    cfg = model.cfg
    num_params = sum(t.numel() for t in llama_state_dict(model).values())
    dropped = model.num_future_tokens - 1
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, lmpipe]
---
# lmpipe GPT exported as Llama

A small decoder-only language model trained with `lmpipe`, exported to a stock `LlamaForCausalLM`.

| | |
|---|---|
| parameters | {num_params:,} |
| layers | {config["num_hidden_layers"]} ({cfg.num_layers} trained; {dropped} extra multi-token heads dropped) |
| d_model / heads (key/value) / MLP width | {cfg.d_model} / {cfg.num_heads} ({cfg.kv_heads}) / \
{config["intermediate_size"]} (SwiGLU) |
| vocabulary | {model.vocab_size} (byte-level BPE, `tokenizer.json`) |
| context | {model.max_seq_len} tokens, rotary theta {cfg.rope_theta:g} |
| tied embeddings | {cfg.tie_embeddings} |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

A research model trained on a small corpus: not evaluated for any use beyond experiments.
"""


def export_llama(model: GPT, tokenizer_json: Path, out_dir: Path, *, eos_token: str = EOT) -> Path:
    """Write `model` and its tokenizer as a folder that `AutoModelForCausalLM.from_pretrained` loads as Llama."""
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    check_exportable(model)
    tokenizer_json, out_dir = Path(tokenizer_json), Path(out_dir)
    eos_id = Tokenizer.from_file(str(tokenizer_json)).token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"eos_token={eos_token!r} is not in the tokenizer {tokenizer_json}")
    if eos_id >= model.vocab_size:
        raise ValueError(f"eos id {eos_id} is outside the model vocabulary ({model.vocab_size})")
    out_dir.mkdir(parents=True, exist_ok=True)

    # GPT-2 convention: one end-of-text token serves as bos, eos, unk (byte-level BPE never needs unk) and pad.
    config = llama_config_dict(model, bos_id=eos_id, eos_id=eos_id)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(llama_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out_dir)
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=eos_token, bos_token=eos_token,
                            unk_token=eos_token, pad_token=eos_token,
                            model_max_length=model.max_seq_len).save_pretrained(out_dir)
    if model.num_future_tokens > 1:
        save_file(extra_heads_state_dict(model), str(out_dir / EXTRA_HEADS),
                  metadata={"format": "pt", "num_future_tokens": str(model.num_future_tokens),
                            "usage": EXTRA_HEADS_USAGE})
    (out_dir / "README.md").write_text(model_card(model, config))
    logger.info("exported %d-layer Llama (vocab %d) to %s", config["num_hidden_layers"], model.vocab_size, out_dir)
    return out_dir
