"""Stage evaluate: compare the reference and every target model (each variant's seed runs) on the same tokens.

Models: `reference` and every target run, `<variant>` or `<variant>.seed<r>` (TargetConfig.seeds).
Output files in `out`:
    eval_losses.parquet    schemas.tables.EVAL_LOSSES (model, split, num_tokens, loss, perplexity): each model on
                           every window (or evaluate.max_windows spread over the split) of `val`, `ref_val` and
                           each extra file (split `file:<name>`, read like the corpus, tokenized with its tokenizer)
    comparison.parquet     schemas.tables.COMPARISON: one row per model with final losses, tokens seen to reach the
                           baseline runs' mean final validation loss (and over the baseline's budget), dynamics
    seed_summary.parquet   schemas.tables.SEED_SUMMARY: per variant and number, mean and spread over its seed runs
    token_dynamics.parquet schemas.tables.TOKEN_DYNAMICS of every target that recorded >= 2 probe checkpoints
    compute.parquet        schemas.tables.COMPUTE: training FLOPs per token and in total, val loss at the
                           baseline's FLOPs, FLOPs to reach the baseline's final val loss, with and without the
                           upstream artifacts' cost (reference training, scoring, SAE, concept labels)
    selection_by_domain.parquet  schemas.tables.SELECTION_BY_DOMAIN: selecting targets' selection rate and excess
                           loss on `train`, inside vs outside the reference subset
    report.md              all of the above as Markdown tables, plus the train split's unigram entropy
    val_loss.png           validation loss vs tokens seen per model (one subplot per validation split)
    head_metrics.parquet   schemas.tables.HEAD_METRICS: per multi-token model, split and head: loss, top-1 accuracy
    speculative.parquet    schemas.tables.SPECULATIVE: greedy vs self-speculative decoding speed per draft count
    val_loss_flops.png     validation loss vs training FLOPs per model
    train_loss.png         training loss vs tokens seen per model
"""

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer

from schemas.configs import DynamicsConfig, EvaluateConfig, PipelineConfig, replica_name, variant_of
from schemas.manifest import Manifest
from schemas.tables import (
    COMPARISON,
    COMPUTE,
    EVAL_LOSSES,
    HEAD_METRICS,
    SEED_SUMMARY,
    SELECTION_BY_DOMAIN,
    SPECULATIVE,
    TOKEN_DYNAMICS,
)
from stages.corpus.files import FileSettings, read_documents
from stages.corpus.packing import pack_stream
from stages.corpus.tokenizers import EOT, encode_documents
from stages.evaluation import dynamics
from stages.evaluation.curves import eval_resolution, metric_curve, selection_summary, tail_mean, tokens_to_reach
from stages.evaluation.domains import selection_by_domain
from stages.evaluation.flops import compute_rows, training_flops_per_token, upstream_flops
from stages.evaluation.heads import head_metrics, speculative_rows
from stages.evaluation.report import (
    REFERENCE,
    VAL_SPLITS,
    compute_markdown,
    concept_markdown,
    domains_markdown,
    heads_markdown,
    plot_curves,
    reach_markdown,
    report_markdown,
    seeds_markdown,
)
from stages.evaluation.seeds import reach_rows, seed_rows
from stages.evaluation.upstream_models import UPSTREAM_MODELS, teacher_markdown, teacher_rows, upstream_names
from stages.models.saved import load_model
from stages.models.window_losses import perplexity, token_losses
from stages.objectives.distillation import TEACHER
from stages.objectives.factory import evaluate_upstream
from stages.registry import NodeDecl, Stage
from stages.runtime import interrupt
from stages.runtime.devices import resolve_device
from stages.training.next_token_run import TEACHER_NODE, init_upstream
from storage.catalog import TableSpec
from storage.checkpoints import read_model_meta
from storage.parquet import read_table, write_table
from storage.windows import TokenWindows, spread_window_ids, stream_file

log = logging.getLogger(__name__)

EVAL_BATCH_WINDOWS = 16
FRACTION_COLUMNS = ("frac_h_to_h", "frac_l_to_h", "frac_h_to_l", "frac_l_to_l")
"""comparison.parquet columns of dynamics.CATEGORIES, in that order."""


def variant_name(target: Manifest) -> str:
    """The variant name of a train_target artifact."""
    return str(target.config["variant"]["name"])


def extra_file_stream(tokens: Manifest, path: str, cfg: EvaluateConfig) -> np.ndarray:
    """The documents of one evaluate.extra_files entry, read as tokenize reads files (.txt cut by
    cfg.extra_text_unit, .jsonl/.parquet by cfg.extra_text_column), tokenized with the corpus tokenizer and
    packed like the corpus: each document's tokens then <|endoftext|>, in file order. ValueError naming the
    file for a missing or empty file or an unsupported extension."""
    settings = FileSettings(text_column=cfg.extra_text_column, text_unit=cfg.extra_text_unit,
                            paths_field="evaluate.extra_files", text_column_field="evaluate.extra_text_column")
    texts = read_documents([path], settings).texts
    tokenizer = Tokenizer.from_file(tokens.file("tokenizer.json"))
    flat_ids, lengths = encode_documents(tokenizer, texts)
    offsets = np.cumsum(lengths) - lengths
    stream, _, _ = pack_stream(flat_ids, offsets, lengths, np.arange(len(texts)), tokenizer.token_to_id(EOT))
    return stream


def mean_window_loss(model, stream_N: np.ndarray, seq_len: int, max_windows: int | None,
                     device: torch.device) -> tuple[int, float]:
    """(targets, mean loss in nats) over every window, or max_windows spread over the stream (one short window
    if none is full)."""
    windows = TokenWindows.from_array(stream_N, min(seq_len, len(stream_N) - 1), "eval")
    loss_NT = token_losses(model, windows, spread_window_ids(len(windows), max_windows), EVAL_BATCH_WINDOWS, device)
    return loss_NT.size, float(loss_NT.astype(np.float64).mean())


def unigram_entropy(stream_N: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> float:
    """Entropy in nats/token of the token frequencies of a stream (counted chunk by chunk)."""
    counts_V = np.zeros(vocab_size, np.int64)
    for start in range(0, len(stream_N), chunk):
        counts_V += np.bincount(np.asarray(stream_N[start:start + chunk]), minlength=vocab_size)[:vocab_size]
    p_V = counts_V[counts_V > 0] / counts_V.sum()
    return float(-(p_V * np.log(p_V)).sum())


def dynamics_threshold(target: Manifest) -> float:
    """delta_threshold of the target's dynamics config (TargetRun or {target, variant} layout)."""
    config = target.config.get("dynamics") or target.config.get("target", {}).get("dynamics") or {}
    return float(config.get("delta_threshold", DynamicsConfig().delta_threshold))


def run(cfg: EvaluateConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Evaluate every model, compare training curves and token dynamics; write tables, report and plots."""
    tokens = inputs["tokens"]
    by_name = {role.removeprefix("target."): m for role, m in inputs.items() if role.startswith("target.")}
    names, targets = list(by_name), list(by_name.values())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    seq_len = int(tokens.config["seq_len"])
    for name, target in by_name.items():
        if variant_of(name) != variant_name(target):
            raise ValueError(f"evaluate: model {name!r} is an artifact of variant {variant_name(target)!r}")
    uppers = upstream_names(inputs)  # reference, teacher, base: evaluated beside the students
    if clash := set(UPSTREAM_MODELS.values()) & set(names):
        raise ValueError(f"target variant names must not be {sorted(clash)} (upstream models' names)")
    baseline_models = [name for name in names if variant_of(name) == cfg.baseline]
    if not baseline_models:
        raise ValueError(f"evaluate.baseline: {cfg.baseline!r} is not among the target variants {names}")
    metrics = {}  # read first: a broken target fails before any model is evaluated
    for name, target in zip(names, targets, strict=True):
        path = Path(target.file("metrics.parquet"))
        if not path.is_file():
            raise ValueError(f"target {name!r} has no metrics.parquet in {target.path}; rebuild it (train_target)")
        metrics[name] = read_table(path)
    streams = {split: np.load(Path(tokens.path) / stream_file(split), mmap_mode="r") for split in VAL_SPLITS}
    for path in cfg.extra_files:
        split = f"file:{Path(path).name}"
        if split in streams:
            raise ValueError(f"evaluate.extra_files: two files are named {Path(path).name!r}; rename one")
        streams[split] = extra_file_stream(tokens, path, cfg)

    eval_rows, head_rows, speculative, domain_rows = [], [], [], []
    upper_manifests = {UPSTREAM_MODELS[role]: inputs[role] for role in UPSTREAM_MODELS if role in inputs}
    for name, manifest in list(upper_manifests.items()) + list(zip(names, targets, strict=True)):
        interrupt.check(f"evaluate stopped before model {name} (nothing of it is kept); run again to go on")
        model = load_model(Path(manifest.path), device)
        if "scores" in inputs and (name == REFERENCE or name not in upper_manifests):
            domain_rows += selection_by_domain(name, model, manifest, tokens, inputs["scores"],
                                               cfg.domain_windows, EVAL_BATCH_WINDOWS, device)
        for split, stream_N in streams.items():
            num_tokens, loss = mean_window_loss(model, stream_N, seq_len, cfg.max_windows, device)
            eval_rows.append({"model": name, "split": split, "num_tokens": num_tokens, "loss": loss,
                              "perplexity": perplexity(loss)})
            log.info("%s on %s: loss %.4f over %d tokens", name, split, loss, num_tokens)
        if model.num_future_tokens > 1:
            head_rows += multi_token_heads(model, name, streams, seq_len, cfg.max_windows, device)
            speculative += [{"model": name, **row} for row in speculative_rows(
                model.cpu(), speculative_prompts(streams["val"], seq_len, cfg.speculative_prompts),
                cfg.speculative_new_tokens)]
        del model
    write_table(out / "eval_losses.parquet", pa.Table.from_pylist(eval_rows, EVAL_LOSSES), EVAL_LOSSES)
    write_table(out / "head_metrics.parquet", pa.Table.from_pylist(head_rows, HEAD_METRICS), HEAD_METRICS)
    write_table(out / "speculative.parquet", pa.Table.from_pylist(speculative, SPECULATIVE), SPECULATIVE)
    write_table(out / "selection_by_domain.parquet", pa.Table.from_pylist(domain_rows, SELECTION_BY_DOMAIN),
                SELECTION_BY_DOMAIN)
    losses = {(r["model"], r["split"]): r["loss"] for r in eval_rows}

    reach = {split: tokens_to_reach(metrics, baseline_models, split) for split in VAL_SPLITS}

    dynamics_tables, fractions = [], {}
    for name, target in zip(names, targets, strict=True):
        probe_path = Path(target.file("probe_losses.parquet"))
        if probe_path.is_file():
            probe = read_table(probe_path)
            if len(np.unique(probe["step"].to_numpy())) < 2:
                log.info("%s: probe losses at fewer than 2 checkpoints; no token dynamics", name)
                continue
            dynamics_tables.append(dynamics.classify(probe, dynamics_threshold(target), variant=name))
            fractions[name] = dynamics.fractions(dynamics_tables[-1])
    write_table(out / "token_dynamics.parquet",
                pa.concat_tables(dynamics_tables) if dynamics_tables else TOKEN_DYNAMICS.empty_table(), TOKEN_DYNAMICS)

    rows = []
    for name in uppers + names:
        row = {"model": name}
        for split in VAL_SPLITS:
            row[f"{split}_loss"] = losses[name, split]
            row[f"{split}_perplexity"] = perplexity(losses[name, split])
        for split in VAL_SPLITS:
            row[f"tokens_to_baseline_{split}"], row[f"ratio_to_baseline_{split}"] = reach[split].get(name, (None, None))
        for category, column in zip(dynamics.CATEGORIES, FRACTION_COLUMNS, strict=True):
            row[column] = fractions.get(name, {}).get(category)
        rows.append(row)
    write_table(out / "comparison.parquet", pa.Table.from_pylist(rows, COMPARISON), COMPARISON)

    train_stream = np.load(Path(tokens.path) / stream_file("train"), mmap_mode="r")
    vocab_size = int(tokens.summary.get("vocab_size") or int(train_stream.max()) + 1)
    entropy = unigram_entropy(train_stream, vocab_size)
    extra = [r for r in eval_rows if r["split"].startswith("file:")]
    compute = compute_ledger(metrics, inputs, by_name, baseline_models, upper_manifests)
    write_table(out / "compute.parquet", pa.Table.from_pylist(compute, COMPUTE), COMPUTE)
    per_model = {row["model"]: dict(row) for row in rows if row["model"] not in uppers}
    for row in compute:
        if row["model"] in per_model:
            per_model[row["model"]] |= row
    seeds = seed_rows(per_model, cfg.baseline) + reach_rows(per_model, cfg.baseline,
                                                            eval_resolution(metrics, baseline_models))
    write_table(out / "seed_summary.parquet", pa.Table.from_pylist(seeds, SEED_SUMMARY), SEED_SUMMARY)
    concept_rows = concept_summary(metrics)
    (out / "report.md").write_text(
        teacher_markdown(teacher_rows(uppers, upper_manifests | by_name, losses, baseline_models), cfg.baseline)
        + report_markdown(rows, entropy, cfg.baseline, extra, selection_summary(metrics))
        + reach_markdown(seeds, cfg.baseline) + seeds_markdown(seeds)
        + compute_markdown(compute, cfg.baseline) + domains_markdown(domain_rows)
        + concept_markdown(concept_rows, inputs.get("sae")) + heads_markdown(head_rows, speculative))
    flops_per_token = {row["model"]: row["train_flops_per_token"] for row in compute}
    plots = plot_curves(metrics, losses, out, flops_per_token)
    summary = {
        "final_losses": {name: {s: losses[name, s] for s in streams} for name in uppers + names},
        "tokens_to_baseline": {s: {n: v[0] for n, v in r.items()} for s, r in reach.items()},
        "dynamics_fractions": fractions,
        "unigram_entropy_nats": entropy,
        "train_flops_per_token": flops_per_token,
        "speculative_speedup": {r["model"]: max(x["speedup"] for x in speculative if x["model"] == r["model"])
                                for r in speculative},
        "files": ["eval_losses.parquet", "comparison.parquet", "token_dynamics.parquet", "compute.parquet",
                  "seed_summary.parquet", "selection_by_domain.parquet", "head_metrics.parquet",
                  "speculative.parquet", "report.md", *plots],
    }
    log.info("evaluate: %s", summary)
    return summary


def multi_token_heads(model, name: str, streams: dict, seq_len: int, max_windows: int | None,
                      device) -> list[dict]:
    """head_metrics.parquet rows of one multi-token model on the validation splits."""
    rows = []
    for split in VAL_SPLITS:
        windows = TokenWindows.from_array(streams[split], seq_len, split)
        ids = spread_window_ids(len(windows), max_windows)
        rows += [{"model": name, "split": split, **row}
                 for row in head_metrics(model, windows, ids, EVAL_BATCH_WINDOWS, device)]
    return rows


def speculative_prompts(stream_N: np.ndarray, seq_len: int, count: int, length: int = 16) -> list[list[int]]:
    """The first `length` tokens of `count` windows spread evenly over a split."""
    num_windows = max(1, (len(stream_N) - 1) // seq_len)
    starts = spread_window_ids(num_windows, count) * seq_len
    return [np.asarray(stream_N[s:s + length]).astype(int).tolist() for s in starts]


def compute_ledger(metrics: dict[str, pa.Table], inputs: dict[str, Manifest], targets: dict[str, Manifest],
                   baseline_models: list[str], uppers: dict[str, Manifest] | None = None) -> list[dict]:
    """compute.parquet rows: FLOPs per token from each model.json (plus the teacher's forward when the target
    read a teacher), and the one-off FLOPs of the upstream artifacts each target reads (flops.upstream_flops);
    then a row per upstream model (`uppers`: reference, teacher, base) with its own training FLOPs."""
    reference = inputs["reference"]
    reference_spec = read_model_meta(Path(reference.path))
    reference_cost = {"spec": reference_spec, "tokens_seen": int(reference.summary.get("tokens_seen", 0))}
    teacher = inputs.get(TEACHER)
    teacher_spec = read_model_meta(Path(teacher.path)) if teacher is not None else None
    teacher_cost = {"spec": teacher_spec, "tokens_seen": int(teacher.summary.get("tokens_seen", 0))} \
        if teacher is not None else None
    scored = sum((inputs["scores"].summary.get("num_rows") or {}).values()) if "scores" in inputs else 0
    sae = inputs["sae"].summary if "sae" in inputs else None
    labelled = int(inputs["concepts"].summary.get("rows", 0)) if "concepts" in inputs else 0
    fpt, params, upstream = {}, {}, {}
    for name, target in targets.items():
        spec = read_model_meta(Path(target.path))
        run_teacher = (teacher_spec or reference_spec) if TEACHER in target.upstream else None  # run per token
        fpt[name] = training_flops_per_token(spec, run_teacher)
        params[name] = int(target.summary.get("num_params", 0))
        upstream[name] = upstream_flops(set(target.upstream), reference_cost, scored, sae, labelled, teacher_cost)
    curves = {name: metric_curve(table, "val/val/loss") for name, table in metrics.items()}
    for name, manifest in (uppers or {}).items():  # their own training, on their own data
        metrics_path = Path(manifest.file("metrics.parquet"))
        curves[name] = metric_curve(read_table(metrics_path), "val/val/loss") if metrics_path.is_file() \
            else (np.zeros(0), np.zeros(0))
        fpt[name] = training_flops_per_token(read_model_meta(Path(manifest.path)))
        params[name] = int(manifest.summary.get("num_params", 0))
    return compute_rows(curves, fpt, params, baseline_models, upstream)


def concept_summary(metrics: dict[str, pa.Table]) -> list[dict]:
    """Variants with a concept loss: its mean and the top-1-in-labels rate over the last 10% of steps."""
    rows = []
    for name, table in metrics.items():
        loss = tail_mean(table, "train/concept_loss")
        if loss is not None:
            rows.append({"model": name, "concept_loss": loss,
                         "top1_in_labels": tail_mean(table, "train/concept_top1_in_labels")})
    return rows


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """One evaluation of the reference and every target variant."""
    upstream = {"tokens": "tokenize_corpus", "reference": "train_reference"} | init_upstream(cfg, role="base")
    if any(v.concepts is not None or v.distill is not None for v in cfg.target.variants):
        upstream[TEACHER] = TEACHER_NODE  # the concept source / distillation teacher, reported beside the students
    upstream |= {f"target.{name}": f"train_target.{name}"
                 for v in cfg.target.variants for name in (replica_name(v.name, r) for r in range(cfg.target.seeds))}
    for variant in cfg.target.variants:  # what the variants' objective parts are reported from
        upstream |= evaluate_upstream(variant)
    return [NodeDecl("evaluate", cfg.evaluate, upstream)]


STAGE = Stage(
    name="evaluate", code_version="5", config_type=EvaluateConfig, nodes=nodes, run=run,
    tables={"eval_losses": TableSpec("evaluate", "eval_losses.parquet"),
            "comparison": TableSpec("evaluate", "comparison.parquet"),
            "compute": TableSpec("evaluate", "compute.parquet"),
            "seed_summary": TableSpec("evaluate", "seed_summary.parquet"),
            "selection_by_domain": TableSpec("evaluate", "selection_by_domain.parquet"),
            "head_metrics": TableSpec("evaluate", "head_metrics.parquet"),
            "speculative": TableSpec("evaluate", "speculative.parquet"),
            "token_dynamics": TableSpec("evaluate", "token_dynamics.parquet")},
    description="comparison tables, plots, token dynamics",
)
