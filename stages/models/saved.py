"""Load a model saved by storage.checkpoints.save_model (model.safetensors + model.json) back into a GPT."""

from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_model

from schemas.configs import ModelConfig
from stages.models.gpt import GPT
from storage.checkpoints import MODEL_WEIGHTS, read_model_meta


def load_model(directory: Path, device: torch.device | str = "cpu") -> GPT:
    """Rebuild exactly the GPT saved in `directory` (heads and inserts included), in eval mode on `device`."""
    meta = read_model_meta(directory)
    inserts = {int(layer): spec for layer, spec in meta.get("inserts", {}).items()}
    model = GPT(ModelConfig.model_validate(meta["model"]), int(meta["vocab_size"]), int(meta["seq_len"]),
                num_future_tokens=int(meta.get("num_future_tokens", 1)), inserts=inserts)
    missing, unexpected = load_safetensors_model(model, str(Path(directory) / MODEL_WEIGHTS), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(device).eval()
