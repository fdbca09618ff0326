"""Resumable training checkpoints and the saved model of a finished run.

Files written:
    <work>/checkpoints/step-<step:06d>.pt training state (torch.save of plain types and tensors: model and
                                       optimizer state dicts, step, data-order position, RNG states, metrics
                                       so far); the newest `keep` (default 2) are kept
    <dir>/model.safetensors            model weights (safetensors; tied weights stored once)
    <dir>/model.json                   the model's build_spec() (GPT: config, vocab_size, seq_len,
                                       num_future_tokens, inserts) + caller metadata
Every file is written to a temporary name and renamed into place, so a killed process never leaves half a
file under a final name. Checkpoints hold only plain types, so they load with `weights_only=True`.
"""

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from storage.atomic import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
_CHECKPOINT_RE = re.compile(r"^step-(\d{6,})\.pt$")


def checkpoint_dir(work_dir: Path) -> Path:
    """Where a run keeps its resumable checkpoints."""
    return Path(work_dir) / CHECKPOINT_DIR


def checkpoint_path(directory: Path, step: int) -> Path:
    """File name of the checkpoint after `step` optimizer steps."""
    return Path(directory) / f"step-{step:06d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints in a directory as (step, path), oldest first (temp files ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write the training state after `step` atomically and delete all but the newest `keep` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    log.debug("checkpoint %s written", path)
    return path


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict:
    """Read a checkpoint written by save_checkpoint (plain types only: weights_only=True)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_model(directory: Path, model: nn.Module, meta: dict) -> None:
    """Write model.safetensors and model.json (the model's `build_spec()`, e.g. config, sizes, inserts, plus meta)."""
    if not hasattr(model, "build_spec"):
        raise ValueError(f"save_model: {type(model).__name__} has no build_spec() describing how to rebuild it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = dict(meta) | model.build_spec()
    with atomic_path(directory / MODEL_WEIGHTS) as tmp:
        save_safetensors_model(model, str(tmp))
    write_text_atomic(directory / MODEL_META, json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_model_meta(directory: Path) -> dict:
    """The model.json of a saved model."""
    path = Path(directory) / MODEL_META
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} holds no saved model")
    return json.loads(path.read_text())
