"""Stage train_target: one target variant (next-token, Rho-1 selection, multi-token heads, CoCoMix concepts,
pause slots, distillation, or a mix).

Reads the tokenize_corpus artifact (split `train` to train on; `val` and `ref_val` to evaluate) and whatever
the variant's objective declares it needs (objective.needs): per-token columns of an upstream table (reference
scores, concept labels) looked up by token_index, or an upstream model (the distillation teacher).
Files written into the artifact directory:
    model.safetensors, model.json   the target model (stages/models/saved.load_model reads it back)
    metrics.parquet                 schemas.tables.METRICS (train/*, train/head<i>/loss, train/selected_fraction,
                                    train/concept_loss ..., val/val/*, val/ref_val/*)
    probe_losses.parquet            schemas.tables.PROBE_LOSSES: per-token losses of dynamics.probe_windows
                                    windows spread over `val` at step 0 and every evaluation (Rho-1 Sec. 2.1)
    token_selection.parquet         schemas.tables.TOKEN_SELECTION, for selecting variants: per train token,
                                    times seen and times selected
"""

import logging
from pathlib import Path

import numpy as np

from schemas.configs import PipelineConfig, TargetRun, replica_name
from schemas.manifest import Manifest
from stages.models.saved import load_model
from stages.objectives.base import TokenColumns, UpstreamModel
from stages.objectives.factory import build_objective
from stages.registry import NodeDecl, Stage, stage
from stages.seeded_upstream import seeded_node
from stages.training.loop import ProbeSet, TrainRun, train
from stages.training.next_token_run import checkpoint_vocab, init_model, init_upstream
from storage.catalog import JoinView, TableSpec
from storage.token_columns import dense_token_columns
from storage.windows import TokenWindows, spread_window_ids

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "ref_val")
PROBE_SPLIT = "val"


def token_lookups(need: TokenColumns, manifest: Manifest, windows: TokenWindows) -> dict[str, np.ndarray]:
    """The needed columns as arrays indexed by token_index; checks every training target has a finite row."""
    token_table = stage(need.stage.split(".", 1)[0]).token_table  # a node `<stage>.<name>` reads like its stage
    if token_table is None:
        raise ValueError(f"stage {need.stage} declares no per-token table to read {need.columns} from")
    files = token_table.files(manifest, windows.split)
    if not files:
        raise ValueError(f"{need.stage} artifact {manifest.path} has no rows for split {windows.split!r}; "
                         f"rebuild it (lmpipe run --force {need.stage})")
    columns, present_N = dense_token_columns(files, need.columns, windows.num_tokens)
    num_targets = len(windows) * windows.seq_len
    missing = np.flatnonzero(~present_N[1: num_targets + 1])
    if len(missing):
        raise ValueError(f"{need.stage} artifact {manifest.path} lacks {len(missing)} of the {num_targets} training "
                         f"targets (first token_index {missing[0] + 1}); rebuild it for this tokens artifact")
    for name, values in columns.items():
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values[1: num_targets + 1]).all():
            raise ValueError(f"{need.stage} column {name} is non-finite at some training targets; rebuild it")
    return columns


def run(cfg: TargetRun, inputs: dict[str, Manifest], out: Path) -> dict:
    """Train one target variant on `train` into `out`; returns the training summary."""
    tokens, variant = inputs["tokens"], cfg.variant
    model_cfg, vocab = cfg.model, checkpoint_vocab(cfg.init_from)
    if cfg.init_from is not None:  # the checkpoint's L layers are the trunk and head 0; each extra head one more
        model_cfg = model_cfg.model_copy(update={"num_layers": model_cfg.num_layers + variant.num_future_tokens - 1})
    objective = build_objective(model_cfg, variant, inputs)
    train_windows = TokenWindows.from_manifest(tokens, TRAIN_SPLIT)
    val_windows = {split: TokenWindows.from_manifest(tokens, split) for split in EVAL_SPLITS}
    lookups: dict[str, np.ndarray] = {}
    models = {}
    for need in objective.needs:
        if need.role not in inputs:
            raise ValueError(f"variant {variant.name!r} needs the {need.stage} artifact (role {need.role!r}); "
                             f"none was given")
        if isinstance(need, TokenColumns):
            lookups |= token_lookups(need, inputs[need.role], train_windows)
        elif isinstance(need, UpstreamModel):
            models[need.role] = load_model(Path(inputs[need.role].path))
    probe_ids = spread_window_ids(len(val_windows[PROBE_SPLIT]), cfg.dynamics.probe_windows)
    probe = ProbeSet(PROBE_SPLIT, probe_ids) if len(probe_ids) else None
    meta = {"stage": "train_target", "variant": variant.model_dump(mode="json"), "tokens_key": tokens.key,
            "upstream_keys": {role: m.key for role, m in inputs.items()}}
    return train(TrainRun(objective, train_windows, val_windows, cfg.train, Path(out),
                          vocab_size=vocab or int(tokens.summary["vocab_size"]),
                          label=f"target/{variant.name} seed {cfg.train.seed}", lookups=lookups,
                          upstream_models=models, probe=probe, meta=meta, init_from=init_model(inputs),
                          checkpoint=cfg.init_from))


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """One node per variant and seed run; its upstream roles are what the variant's objective needs."""
    decls = []
    for variant in cfg.target.variants:
        upstream = {"tokens": "tokenize_corpus"}
        upstream |= {need.role: need.stage for need in build_objective(cfg.target.model, variant).needs}
        upstream |= init_upstream(cfg)  # continual pretraining: start from the base model
        for replica in range(cfg.target.seeds):  # seed runs may read their own upstream (cfg.seed_upstream)
            decls.append(NodeDecl(f"train_target.{replica_name(variant.name, replica)}",
                                  TargetRun.of(cfg.target, variant, replica),
                                  {role: seeded_node(up, replica, cfg) for role, up in upstream.items()}))
    return decls


STAGE = Stage(
    name="train_target", code_version="3", config_type=TargetRun, nodes=nodes, run=run,
    tables={"target_metrics": TableSpec("train_target", "metrics.parquet", per_model=True),
            "probe_losses": TableSpec("train_target", "probe_losses.parquet", per_model=True),
            "token_selection": TableSpec("train_target", "token_selection.parquet", per_model=True)},
    views={
        "target_token_losses": JoinView(
            frozenset({"probe_losses", "token_scores", "vocab"}),
            """SELECT p.model, p.split, p.token_index, s.doc_id, s.position, v.token, p.loss AS target_loss,
                      s.ref_loss, p.loss - s.ref_loss AS excess_loss, s.ref_entropy
               FROM probe_losses p
               JOIN (SELECT model, max(step) AS step FROM probe_losses GROUP BY model) last USING (model, step)
               JOIN token_scores s USING (split, token_index) JOIN vocab v USING (token_id)"""),
        "metrics": JoinView(
            frozenset({"reference_metrics", "target_metrics"}),
            """SELECT 'train_reference' AS model, * FROM reference_metrics
               UNION ALL BY NAME SELECT * FROM target_metrics"""),
    },
    description="one target model per variant",
)
