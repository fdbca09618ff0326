"""Model files of artifacts: a GPT saved by storage.checkpoints.save_model (or a frozen Hugging Face model kept
by a role started from a checkpoint: stages/models/hf_adapter.py), and the SAE of train_sae."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from schemas.configs import ModelConfig
from stages.models.gpt import GPT
from stages.models.hf_adapter import HF_DIR, HF_FORMAT, HFModel, load_hf_model
from stages.models.sae import TopKSAE
from storage.atomic import atomic_path, write_text_atomic
from storage.checkpoints import MODEL_WEIGHTS, read_model_meta

SAE_WEIGHTS, SAE_META = "sae.safetensors", "sae.json"


def load_model(directory: Path, device: torch.device | str = "cpu") -> GPT | HFModel:
    """Rebuild exactly the GPT saved in `directory` (heads and inserts included), in eval mode on `device`; a
    frozen Hugging Face model for an artifact that keeps one (model.json format "hf")."""
    meta = read_model_meta(directory)
    if meta.get("format") == HF_FORMAT:
        return load_hf_model(Path(directory) / HF_DIR, int(meta["seq_len"]), device)
    inserts = {int(layer): spec for layer, spec in meta.get("inserts", {}).items()}
    model = GPT(ModelConfig.model_validate(meta["model"]), int(meta["vocab_size"]), int(meta["seq_len"]),
                num_future_tokens=int(meta.get("num_future_tokens", 1)), inserts=inserts)
    missing, unexpected = load_safetensors_model(model, str(Path(directory) / MODEL_WEIGHTS), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(device).eval()


def save_sae(directory: Path, sae: TopKSAE, meta: dict) -> None:
    """sae.safetensors + sae.json (its config and `meta`)."""
    with atomic_path(Path(directory) / SAE_WEIGHTS) as tmp:
        save_safetensors_model(sae, str(tmp))
    write_text_atomic(Path(directory) / SAE_META, json.dumps(sae.config() | meta, indent=2, sort_keys=True))


def load_sae(directory: Path, device: torch.device | str = "cpu") -> tuple[TopKSAE, dict]:
    """The SAE of a train_sae artifact and its sae.json."""
    meta_path = Path(directory) / SAE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: rebuild train_sae (lmpipe run --force train_sae)")
    meta = json.loads(meta_path.read_text())
    sae = TopKSAE(int(meta["d_model"]), int(meta["num_latents"]), int(meta["k"]),
                  input_norm=meta.get("input_norm", "layer_norm"))
    load_safetensors_model(sae, str(Path(directory) / SAE_WEIGHTS), strict=True)
    return sae.to(device).eval(), meta
