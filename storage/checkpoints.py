"""Resumable training checkpoints and the saved model of a finished run.

Files written:
    <work>/checkpoints/step-<step:06d>/  training state; the newest `keep` (default 2) are kept:
        *.distcp, .metadata              model and optimizer state dicts (torch.distributed.checkpoint: one file
                                         per rank, resharded on load, so a run resumes at another process count)
        run.pt                           step, data-order position, RNG states, metrics so far, objective state
                                         (torch.save of plain types)
    <dir>/model.safetensors              model weights (safetensors; tied weights stored once)
    <dir>/model.json                     the model's build_spec() (GPT: config, vocab_size, seq_len,
                                         num_future_tokens, inserts) + caller metadata
Every file and checkpoint folder is written under a temporary name and renamed into place, so a killed process
never leaves half of one under a final name. run.pt holds only plain types, so it loads with `weights_only=True`.
"""

import json
import logging
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from storage.atomic import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
_CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
RUN_STATE = "run.pt"


def checkpoint_dir(work_dir: Path) -> Path:
    """Where a run keeps its resumable checkpoints."""
    return Path(work_dir) / CHECKPOINT_DIR


def checkpoint_path(directory: Path, step: int) -> Path:
    """Folder of the checkpoint after `step` optimizer steps."""
    return Path(directory) / f"step-{step:06d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints in a directory as (step, path), oldest first (unfinished temp folders ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / RUN_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: Path, step: int, state: dict, tensors: dict, keep: int = 2, *, writer: bool = True,
                    barrier: Callable[[], None] | None = None) -> Path:
    """Write the checkpoint after `step` and delete all but the newest `keep` checkpoints.

    `tensors` (model and optimizer state dicts, sharded or not) go through torch.distributed.checkpoint: every
    rank of a distributed run calls this and writes its own shards. `state` (plain types: run state, RNGs) is
    written by the `writer` rank as run.pt. Everything lands in a temporary folder that the writer renames into
    place once every rank has finished, so a killed run never leaves a partial checkpoint under a final name."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    tmp = directory / f".tmp-{path.name}"
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    if barrier is not None:
        barrier()
    import torch.distributed.checkpoint as dcp  # ~0.9 s to import: kept off the path of commands that train nothing

    with _single_process_quiet():  # collective: returns once every rank's shards and the metadata are written
        dcp.save(tensors, checkpoint_id=tmp, no_dist=barrier is None)
    if writer:
        with atomic_path(tmp / RUN_STATE, fsync=True) as run_tmp:
            torch.save(state, run_tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for _, old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.debug("checkpoint %s written", path)
    if barrier is not None:
        barrier()
    return path


def load_checkpoint(path: Path, tensors: dict | None = None) -> dict:
    """The plain state of a checkpoint (run.pt, weights_only) onto the CPU; with `tensors` (state dicts shaped like
    the saved ones, sharded or not), also load the saved tensors into them in place (any process count)."""
    if tensors is not None:
        import torch.distributed.checkpoint as dcp

        with _single_process_quiet():
            dcp.load(tensors, checkpoint_id=Path(path), no_dist=not (dist.is_available() and dist.is_initialized()))
    return torch.load(Path(path) / RUN_STATE, map_location="cpu", weights_only=True)


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes a single process, which is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


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


def training_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts by fully qualified names (sharded under FSDP), as checkpoints hold them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def set_training_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load state dicts shaped like training_state's into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def full_model_state(model: nn.Module) -> dict:
    """The whole (unsharded) model state dict on the CPU; every rank must call this together."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def remove_checkpoints(directory: Path) -> None:
    """Delete a run's checkpoints folder (once its final model is saved)."""
    shutil.rmtree(directory, ignore_errors=True)
