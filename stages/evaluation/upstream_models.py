"""The upstream models beside the students: the Rho-1 reference, the teacher (CoCoMix's concept source and the
distillation teacher) and the continual base, evaluated like the targets so one table (and one SQL query over
`comparison` / `compute`) compares them; and the warning when the teacher is no better than the baseline."""

from stages.evaluation.report import markdown_table

UPSTREAM_MODELS = {"reference": "reference", "teacher": "teacher", "base": "base"}
"""evaluate's upstream role -> model name in comparison.parquet / compute.parquet (the name says the role)."""
ROLE_TEXT = {"reference": "Rho-1 reference (selection scores)",
             "teacher": "teacher: concept source (SAE, labels) and distillation teacher",
             "base": "continual base (reference and targets start from it)"}


def upstream_names(inputs: dict) -> list[str]:
    """The upstream models evaluate has (role names present in its inputs), in UPSTREAM_MODELS order."""
    return [name for role, name in UPSTREAM_MODELS.items() if role in inputs]


def teacher_rows(names: list[str], manifests: dict, losses: dict, baseline_models: list[str]) -> list[dict]:
    """Per upstream model and for the baseline (mean over its runs): params, tokens trained, val / ref_val loss and
    the val difference to the baseline's mean."""
    def mean(split):
        return sum(losses[m, split] for m in baseline_models) / len(baseline_models)

    base_val = mean("val")
    rows = []
    for name in names:
        summary = manifests[name].summary
        rows.append({"model": name, "role": ROLE_TEXT[name], "num_params": summary.get("num_params"),
                     "tokens_seen": summary.get("tokens_seen"), "val_loss": losses[name, "val"],
                     "ref_val_loss": losses[name, "ref_val"], "val_minus_baseline": losses[name, "val"] - base_val})
    first = manifests[baseline_models[0]].summary
    rows.append({"model": f"{baseline_models[0]} (mean of {len(baseline_models)})", "role": "the baseline student",
                 "num_params": first.get("num_params"), "tokens_seen": first.get("tokens_seen"),
                 "val_loss": base_val, "ref_val_loss": mean("ref_val"), "val_minus_baseline": 0.0})
    return rows


def teacher_warning(rows: list[dict], baseline: str) -> str | None:
    """A warning when the teacher is not better than the baseline student on `val` (None when it is, or when the
    run has no teacher)."""
    teacher = next((r for r in rows if r["model"] == UPSTREAM_MODELS["teacher"]), None)
    if teacher is None or teacher["val_minus_baseline"] < 0:
        return None
    return (f"**Warning**: the teacher is not better than {baseline} on `val` ({teacher['val_loss']:.4f} vs "
            f"{teacher['val_loss'] - teacher['val_minus_baseline']:.4f}): concepts and distillation learn from a "
            "model no stronger than the student, so a loss of cocomix or kd says more about the teacher than about "
            "the method. Give it more tokens or width (teacher.train.max_tokens, teacher.model).")


def teacher_markdown(rows: list[dict], baseline: str) -> str:
    """The report section: upstream models against the baseline student, and the teacher warning."""
    if len(rows) < 2:
        return ""
    lines = ["", f"Teacher, reference and base against the students (final losses; {baseline} = the baseline):", ""]
    lines += markdown_table(rows, [("model", "model", "s"), ("role", "role", "s"), ("num_params", "params", ","),
                                   ("tokens_seen", "tokens trained", ","), ("val_loss", "val loss", ".4f"),
                                   ("ref_val_loss", "ref_val loss", ".4f"),
                                   ("val_minus_baseline", f"val - {baseline}", "+.4f")])
    warning = teacher_warning(rows, baseline)
    return "\n".join(lines + ([""] + [warning] if warning else [])) + "\n"
