"""A frozen Hugging Face `AutoModelForCausalLM` behind the methods lmpipe's forward-only roles call on a GPT:
reference scoring (`forward` -> logits, per-token loss through stages/models/window_losses.py), the distillation
teacher (`forward`), SAE activations (`residual_after`) and attribution (`loss_from`: the loss when the residual
after a layer is replaced, e.g. by an SAE reconstruction, differentiable w.r.t. that residual).

Any architecture whose decoder layers sit in a known list works (GPT-2's `transformer.h`, Llama/Qwen2/Mistral's
`model.layers`); the layer is chosen by index and "the residual after layer i" is the output of that decoder layer
(= `hidden_states[i + 1]`, except after the last layer, where hidden_states holds the final norm's output).
Weights are loaded in fp32 on the CPU (exact; CUDA runs under bf16 autocast like the GPT) and never trained.

A role that keeps such a model (a reference or teacher with train.max_tokens = 0 from a checkpoint that is not
Llama) stores a copy of the checkpoint's files in its artifact (`hf/`) with a model.json saying so
(`"format": "hf"`); stages/models/saved.py's load_model hands such an artifact to load_hf_model.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from stages.models.checkpoint_files import folder_files
from stages.models.losses import frozen_unembed_loss
from storage.atomic import write_text_atomic

HF_DIR = "hf"
"""Folder of an artifact holding the checkpoint's files (config, weights, tokenizer)."""
HF_FORMAT = "hf"
"""model.json `format` of such an artifact."""
LAYER_LISTS = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers"}
"""model_type -> attribute path of its decoder layers: the architectures a frozen role accepts."""
FINAL_NORMS = {"gpt2": "transformer.ln_f"}
"""model_type -> its final norm, where not `model.norm` (latent dashboards read its gain)."""


class _Stop(Exception):
    """Raised by the capture hook: the layers after the captured one need not run."""


def read_config(directory: str | Path) -> dict:
    """config.json of a checkpoint folder; one-line ValueError naming the file and the fix when it is missing."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing; a Hugging Face checkpoint folder needs config.json (save the model "
                         "with save_pretrained)")
    return json.loads(path.read_text())


def frozen_shape(config: dict, path: Path) -> dict:
    """layers, width, heads, vocabulary and max positions of any supported config.json (GPT-2's names or
    Llama's); ValueError for an architecture no frozen role can use."""
    model_type = config.get("model_type")
    if model_type not in LAYER_LISTS:
        raise ValueError(f"{path}: model_type {model_type!r} is not one lmpipe can run (supported: "
                         f"{', '.join(LAYER_LISTS)})")
    if model_type == "gpt2":
        return {"num_layers": config["n_layer"], "d_model": config["n_embd"], "num_heads": config["n_head"],
                "vocab_size": config["vocab_size"], "max_positions": config.get("n_positions", 1024),
                "mlp_hidden": config.get("n_inner") or 4 * config["n_embd"], "mlp": "gelu", "num_kv_heads": None}
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return {"num_layers": config["num_hidden_layers"], "d_model": config["hidden_size"], "num_heads": heads,
            "vocab_size": config["vocab_size"], "max_positions": config.get("max_position_embeddings", 2048),
            "mlp_hidden": config["intermediate_size"], "mlp": "swiglu", "num_kv_heads": None if kv == heads else kv}


class HFModel(nn.Module):
    """A frozen AutoModelForCausalLM with the GPT methods the forward-only stages call (see the module doc)."""

    def __init__(self, hf: nn.Module, max_seq_len: int):
        super().__init__()
        self.hf = hf.eval().requires_grad_(False)
        config = hf.config
        path = LAYER_LISTS[config.model_type]
        self.layers = self.hf.get_submodule(path)
        self.vocab_size = int(hf.get_output_embeddings().weight.shape[0])
        self.max_seq_len, self.num_future_tokens, self.insert_specs = max_seq_len, 1, {}
        self.cfg = SimpleNamespace(num_layers=len(self.layers), d_model=int(hf.get_input_embeddings().weight.shape[1]))
        self.layer_norm_blocks = config.model_type == "gpt2"
        """LayerNorm blocks: an SAE trained through TransformerLens reads this model's residual centred."""

    @property
    def lm_head(self) -> nn.Module:
        """The unembedding (a Linear: `.weight` is (V, D))."""
        return self.hf.get_output_embeddings()

    @property
    def norm(self) -> nn.Module:
        """The final norm before the unembedding."""
        return self.hf.get_submodule(FINAL_NORMS.get(self.hf.config.model_type, "model.norm"))

    @property
    def num_trunk_layers(self) -> int:
        """Layers before the last one (a GPT's trunk: `residual_after` takes 0..num_trunk_layers)."""
        return self.cfg.num_layers - 1

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V)."""
        return self.hf(input_ids=idx_BT, use_cache=False).logits

    def _hook(self, layer: int, fn) -> torch.utils.hooks.RemovableHandle:
        if not 0 <= layer < self.cfg.num_layers:
            raise ValueError(f"layer {layer} is outside the model's layers 0..{self.cfg.num_layers - 1}")
        return self.layers[layer].register_forward_hook(fn)

    def residual_after(self, idx_BT: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual stream after decoder layer `layer` (the layers after it are not run)."""
        captured = []

        def capture(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self._hook(layer, capture)
        try:
            self.hf(input_ids=idx_BT, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def loss_from(self, h_BTD: torch.Tensor, layer: int, targets_BT: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss (fp32) when the residual after layer `layer` is h_BTD: a forward whose hook swaps
        h_BTD in for that layer's output (the layers before it run on placeholder tokens and are discarded;
        positions depend only on the length), so the loss is differentiable w.r.t. h_BTD. The supported
        architectures' logits are the base model's last hidden state (after the final norm) times the unembedding
        (no bias, no soft-cap), so the loss goes through frozen_unembed_loss: with a 50k vocabulary the (N, V)
        logits are never materialized."""
        def swap(module, args, output):
            return (h_BTD, *output[1:]) if isinstance(output, tuple) else h_BTD

        handle = self._hook(layer, swap)
        try:
            hidden_BTD = self.hf.base_model(input_ids=torch.zeros_like(targets_BT), use_cache=False).last_hidden_state
        finally:
            handle.remove()
        return frozen_unembed_loss(hidden_BTD.float(), self.lm_head.weight.float(), targets_BT).mean()


def load_hf_model(directory: str | Path, max_seq_len: int | None = None,
                  device: torch.device | str = "cpu") -> HFModel:
    """The checkpoint folder's model (fp32, eval, frozen) as an HFModel on `device`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load would interleave with the pipeline's log lines
    config = read_config(directory)
    shape = frozen_shape(config, Path(directory) / "config.json")
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return HFModel(hf, max_seq_len or int(shape["max_positions"])).to(device)


def save_hf_artifact(source: str | Path, out: Path, meta: dict) -> dict:
    """Copy the checkpoint's files into out/hf and write out/model.json (format hf, the shape FLOPs are counted
    by, `meta`); returns that model.json."""
    source, target = Path(source), Path(out) / HF_DIR
    target.mkdir(parents=True, exist_ok=True)
    for path in folder_files(source):
        shutil.copy2(path, target / path.name)
    config = read_config(source)
    shape = frozen_shape(config, source / "config.json")
    model = {k: shape[k] for k in ("num_layers", "num_heads", "d_model", "mlp", "mlp_hidden", "num_kv_heads")}
    info = dict(meta) | {"format": HF_FORMAT, "architecture": (config.get("architectures") or ["?"])[0],
                         "source": str(source), "model": model | {"tie_embeddings": True},
                         "vocab_size": shape["vocab_size"], "num_future_tokens": 1, "inserts": {}}
    write_text_atomic(Path(out) / "model.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
