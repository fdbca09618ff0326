"""The plain next-token training run (one head, every token) that train_base, train_teacher and train_reference
share, and the `init` upstream role through which continual pretraining (PipelineConfig.base) hands the base model
to the runs that start from it (train_reference and every train_target variant).

A role with `init_from` starts from a checkpoint folder: a Llama one is built in its shape (the planner put it in
the role's model config) with the checkpoint's vocabulary and its weights loaded (train.max_tokens = 0: saved after
the step-0 evaluation, unchanged); any other architecture (frozen roles only, stages/byom.py checks that) is kept
as it is: its files are copied into the artifact and it is evaluated once (keep_frozen)."""

from pathlib import Path

import numpy as np

from schemas.configs import ModelConfig, PipelineConfig, TargetVariant, TrainConfig
from schemas.manifest import Manifest
from stages.models.gpt import GPT
from stages.models.hf_adapter import read_config, save_hf_artifact
from stages.models.hf_import import llama_model_config
from stages.models.saved import load_model
from stages.objectives.factory import build_objective
from stages.runtime.devices import resolve_device
from stages.training.cadence import Evaluator
from stages.training.loop import TrainRun, train, write_run_tables
from stages.training.state import RunState
from storage.windows import TokenWindows, stream_file

INIT_ROLE = "init"
"""Upstream role of the base model a run starts from (only when the config has a base)."""
INIT_STAGE = "train_base"
"""The stage whose node that role names."""


TEACHER_NODE = "train_teacher"
"""The teacher's node (stages/train_teacher.py): upstream of train_sae, extract_concepts and distilling targets."""


def init_upstream(cfg: PipelineConfig, role: str = INIT_ROLE) -> dict[str, str]:
    """The `init` upstream role (or `role`) of a run that starts from the base: {init: train_base}, or {} without
    a base (so the node's upstream, and its key, stay as they were)."""
    return {role: INIT_STAGE} if cfg.base is not None else {}


def init_model(inputs: dict[str, Manifest]) -> GPT | None:
    """The base model the `init` upstream role names (CPU), or None: start from random weights."""
    return load_model(Path(inputs[INIT_ROLE].path)) if INIT_ROLE in inputs else None


def joined_windows(tokens: Manifest, splits: tuple[str, ...]) -> TokenWindows:
    """The windows of one split, or of several splits' streams joined in order (each stream ends with
    <|endoftext|>, so no document runs into the next split's); ValueError naming a split the artifact lacks."""
    known = tokens.summary.get("num_tokens") or {}
    missing = [split for split in splits if known and split not in known]
    if missing:
        raise ValueError(f"the tokens artifact has no split {missing}; a `general` split needs "
                         "tokenize.general_where")
    if len(splits) == 1:
        return TokenWindows.from_manifest(tokens, splits[0])
    stream = np.concatenate([np.load(Path(tokens.path) / stream_file(split), mmap_mode="r") for split in splits])
    return TokenWindows.from_array(stream, int(tokens.config["seq_len"]), "+".join(splits))


def checkpoint_vocab(init_from: str | None) -> int | None:
    """The embedding rows of a Llama checkpoint folder (the model is built with them), None without one or for
    another architecture (kept frozen)."""
    if init_from is None:
        return None
    config_path = Path(init_from) / "config.json"
    try:
        return llama_model_config(read_config(init_from), config_path)[1]
    except ValueError:
        return None


def train_next_token(model_cfg: ModelConfig, train_cfg: TrainConfig, inputs: dict[str, Manifest], out: Path, *,
                     stage: str, name: str, train_split: str | tuple[str, ...], eval_splits: tuple[str, ...],
                     init_from: str | None = None) -> dict:
    """Train a plain next-token model (variant `name`) on one split (or several joined) of the `tokens` input into
    `out`, evaluating on `eval_splits`, from the `init` input's weights when there is one, or from the checkpoint
    folder `init_from` (see the module doc); returns the training summary."""
    tokens = inputs["tokens"]
    variant = TargetVariant(name=name)
    train_windows = joined_windows(tokens, (train_split,) if isinstance(train_split, str) else tuple(train_split))
    val_windows = {split: TokenWindows.from_manifest(tokens, split) for split in eval_splits}
    meta = {"stage": stage, "variant": variant.model_dump(mode="json"), "tokens_key": tokens.key}
    if INIT_ROLE in inputs:
        meta["init_key"] = inputs[INIT_ROLE].key
    vocab = checkpoint_vocab(init_from)
    if init_from is not None:
        meta["init_from"] = init_from
        if vocab is None:
            return keep_frozen(init_from, train_cfg, train_windows, val_windows, out, name=name, meta=meta)
    return train(TrainRun(build_objective(model_cfg, variant), train_windows, val_windows, train_cfg, Path(out),
                          vocab_size=vocab or int(tokens.summary["vocab_size"]), label=name, meta=meta,
                          init_from=init_model(inputs), checkpoint=init_from))


def keep_frozen(init_from: str, train_cfg: TrainConfig, train_windows: TokenWindows,
                val_windows: dict[str, TokenWindows], out: Path, *, name: str, meta: dict) -> dict:
    """A frozen checkpoint as the role's model: its files copied into `out` (stages/models/hf_adapter.py) and its
    loss on the evaluation splits (metrics.parquet at step 0, like a training run's first evaluation)."""
    info = save_hf_artifact(init_from, Path(out), meta | {"seq_len": train_windows.seq_len})
    device = resolve_device(train_cfg.device)
    model = load_model(Path(out), device)
    run = TrainRun(None, train_windows, val_windows, train_cfg, Path(out), vocab_size=model.vocab_size, label=name)
    state = RunState([0, 0, 0])
    losses = Evaluator(run, device)(model, state)
    write_run_tables(Path(out), state)
    return {"steps": 0, "tokens_seen": 0, "val_loss": losses, "architecture": info["architecture"],
            "num_params": sum(p.numel() for p in model.parameters())}
