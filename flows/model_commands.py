"""`lmpipe export`, `lmpipe generate` and `lmpipe report`: use what the pipeline built (no prefect)."""

from pathlib import Path

from schemas.loading import load_config
from schemas.manifest import Manifest
from stages.dag import plan
from storage.artifacts import MissingArtifactError, artifact_dir, artifact_root, is_built, load_manifest

MODEL_STAGES = ("train_target", "train_reference")


def resolve_model(spec: str, args) -> Manifest:
    """A model artifact from a variant name (`ntp`), `reference`, an artifact key, or an artifact directory."""
    if Path(spec).is_dir():
        return load_manifest(Path(spec))
    nodes = plan(load_config(args.preset, args.config, args.overrides))
    node = nodes.get(f"train_target.{spec}") or (nodes["train_reference"] if spec == "reference" else None)
    if node is not None:
        if not node.is_built():
            raise MissingArtifactError(f"{node.name} is not built yet; build it with: lmpipe run --only {node.stage}")
        return load_manifest(node.path())
    for stage in MODEL_STAGES:
        if is_built(stage, spec):
            return load_manifest(artifact_dir(stage, spec))
    variants = [n.split(".", 1)[1] for n in nodes if n.startswith("train_target.")]
    raise ValueError(f"unknown model {spec!r}: give a variant ({', '.join(variants)}), 'reference', "
                     f"an artifact key or an artifact directory")


def tokenizer_path(model: Manifest) -> Path:
    """The tokenizer.json of the tokens artifact a model was trained on."""
    path = artifact_dir("tokenize_corpus", model.upstream["tokens"]) / "tokenizer.json"
    if not path.is_file():
        raise MissingArtifactError(f"{path} is missing; rebuild with: lmpipe run --only tokenize_corpus")
    return path


def cmd_export(args) -> int:
    """Export a model artifact as a Hugging Face Llama folder (safetensors + tokenizer)."""
    from stages.inference.export_hf import export_llama
    from stages.models.saved import load_model

    manifest = resolve_model(args.model, args)
    out = export_llama(load_model(Path(manifest.path), "cpu"), tokenizer_path(manifest), Path(args.out_dir))
    print(f"exported {manifest.stage}/{manifest.key} to {out}\n"
          f"load with: AutoModelForCausalLM.from_pretrained('{out}'), AutoTokenizer.from_pretrained('{out}')")
    return 0


def cmd_generate(args) -> int:
    """Generate text from a trained model (greedy by default; --temperature > 0 samples)."""
    from tokenizers import Tokenizer

    from stages.inference.generate import generate_text
    from stages.models.saved import load_model

    manifest = resolve_model(args.model, args)
    model = load_model(Path(manifest.path), "cpu")
    tokenizer = Tokenizer.from_file(str(tokenizer_path(manifest)))
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0


def cmd_report(args) -> int:
    """Print the latest evaluation report (Markdown) and the paths of its plots."""
    node = plan(load_config(args.preset, args.config, args.overrides))["evaluate"]
    report_dir = node.path() if node.is_built() else _latest("evaluate")
    if report_dir is None:
        raise MissingArtifactError("no evaluation report yet; build it with: lmpipe run")
    print((report_dir / "report.md").read_text())
    for plot in sorted(report_dir.glob("*.png")):
        print(f"plot: {plot}")
    return 0


def _latest(stage: str) -> Path | None:
    built = [p for p in (artifact_root() / stage).glob("*/_SUCCESS")]
    return max(built, key=lambda p: p.stat().st_mtime).parent if built else None


def add_commands(sub, config_args) -> None:
    """Register `export`, `generate` and `report` on the CLI."""
    export = sub.add_parser("export", help=cmd_export.__doc__)
    config_args(export)
    export.add_argument("model", help="variant name (ntp, slm), 'reference', artifact key or directory")
    export.add_argument("out_dir", help="output folder")
    export.set_defaults(fn=cmd_export)
    generate = sub.add_parser("generate", help=cmd_generate.__doc__)
    config_args(generate)
    generate.add_argument("--model", default="ntp", help="variant name, 'reference', artifact key or directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(fn=cmd_generate)
    report = sub.add_parser("report", help=cmd_report.__doc__)
    config_args(report)
    report.set_defaults(fn=cmd_report)
