"""Stage train_target: one target variant (next-token, Rho-1 selection, multi-token heads, or a mix).

Reads the tokenize_corpus artifact (split `train` to train on; `val` and `ref_val` to evaluate) and, when the
variant selects tokens, the score_reference artifact (per-token reference loss and entropy of `train`).
Files written into the artifact directory:
    model.safetensors, model.json   the target model (stages/models/saved.load_model reads it back)
    metrics.parquet                 schemas.tables.METRICS (train/*, train/head<i>/loss, train/selected_fraction
                                    ..., val/val/*, val/ref_val/*)
    probe_losses.parquet            schemas.tables.PROBE_LOSSES: per-token losses of the first
                                    dynamics.probe_windows windows of `val` at every evaluation (Rho-1 Sec. 2.1)
    token_selection.parquet         schemas.tables.TOKEN_SELECTION, for selecting variants: per train token,
                                    times seen and times selected
"""

import logging
from pathlib import Path

import numpy as np

from schemas.configs import TargetConfig, TargetVariant
from schemas.manifest import Manifest
from stages.objectives.token_prediction import TokenPrediction
from stages.score_reference import load_dense_scores
from stages.training import ProbeSet, ScoreLookup, train
from storage.windows import TokenWindows

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "ref_val")
PROBE_SPLIT = "val"


def dense_score_lookup(ref_loss: np.ndarray, ref_entropy: np.ndarray, windows: TokenWindows) -> ScoreLookup:
    """token_index_BT -> (ref_loss_BT, ref_entropy_BT) from dense per-token arrays; checks every target is scored."""
    num_targets = len(windows) * windows.seq_len
    for name, values in (("ref_loss", ref_loss), ("ref_entropy", ref_entropy)):
        if len(values) < num_targets + 1:
            raise ValueError(f"reference {name} covers {len(values)} tokens, the training windows need "
                             f"{num_targets + 1}; rebuild score_reference for this tokens artifact")
        bad = np.flatnonzero(~np.isfinite(values[1: num_targets + 1]))
        if len(bad):
            raise ValueError(f"reference {name} is missing or non-finite at {len(bad)} training targets "
                             f"(first token_index {bad[0] + 1}); rebuild score_reference")
    return lambda token_index_BT: (ref_loss[token_index_BT], ref_entropy[token_index_BT])


def run(cfg: TargetConfig, variant: TargetVariant, tokens: Manifest, out: Path,
        scores: Manifest | None = None) -> dict:
    """Train one target variant on `train` into `out`; returns the training summary."""
    train_windows = TokenWindows.from_manifest(tokens, TRAIN_SPLIT)
    val_windows = {split: TokenWindows.from_manifest(tokens, split) for split in EVAL_SPLITS}
    score_lookup = None
    if variant.needs_reference_scores:
        if scores is None:
            raise ValueError(f"variant {variant.name!r} selects tokens (selection.kind="
                             f"{variant.selection.kind!r}) and needs the score_reference upstream artifact; "
                             f"none was given")
        ref_loss, ref_entropy = load_dense_scores(scores, TRAIN_SPLIT, train_windows.num_tokens)
        score_lookup = dense_score_lookup(ref_loss, ref_entropy, train_windows)
    num_probe = min(cfg.dynamics.probe_windows, len(val_windows[PROBE_SPLIT]))
    probe = ProbeSet(PROBE_SPLIT, np.arange(num_probe)) if num_probe else None
    meta = {"stage": "train_target", "variant": variant.model_dump(mode="json"), "tokens_key": tokens.key,
            "scores_key": scores.key if scores is not None else None}
    return train(TokenPrediction(cfg.model, variant), train_windows, val_windows, cfg.train, Path(out),
                 vocab_size=int(tokens.summary["vocab_size"]), label=f"target/{variant.name}",
                 score_lookup=score_lookup, probe=probe, meta=meta)
