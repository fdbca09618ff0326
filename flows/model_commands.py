"""`lmpipe export`, `generate`, `steer` and `report`: use what the pipeline built (no prefect)."""

from pathlib import Path

from flows.last_run import config_from_args
from schemas.manifest import Manifest
from stages.dag import plan
from storage.artifacts import MissingArtifactError, is_built, iter_manifests, load_manifest, open_artifact

MODEL_STAGES = ("train_target", "train_reference", "train_teacher", "train_base", "train_sae")
ROLE_NODES = {"reference": "train_reference", "teacher": "train_teacher", "base": "train_base", "sae": "train_sae"}
"""Names of the non-target model nodes (`sae`: export writes the sae-lens layout)."""


def resolve_model(spec: str, args) -> Manifest:
    """A model artifact from a variant name (`ntp`), `reference`, `teacher`, `base`, `sae`, an artifact key, or an
    artifact directory."""
    if Path(spec).is_dir():
        return checked(load_manifest(Path(spec)))
    nodes = plan(config_from_args(args))
    node = nodes.get(f"train_target.{spec}") or nodes.get(ROLE_NODES.get(spec, ""))
    if node is not None:
        if not node.is_built():
            raise MissingArtifactError(f"{node.name} is not built yet; build it with: lmpipe run --only {node.stage}")
        return checked(open_artifact(node.stage, node.key))
    for stage in MODEL_STAGES:
        if is_built(stage, spec):
            return checked(open_artifact(stage, spec))
    variants = [n.split(".", 1)[1] for n in nodes if n.startswith("train_target.")]
    raise ValueError(f"unknown model {spec!r}: give a variant ({', '.join(variants)}), 'reference', 'teacher', "
                     f"'base', 'sae', an artifact key or an artifact directory")


def checked(manifest: Manifest) -> Manifest:
    """The model artifact after re-hashing its files (a corrupt model is refused, not used)."""
    from storage.artifacts import check_inputs

    check_inputs({"model": manifest})
    return manifest


def tokenizer_path(model: Manifest) -> Path:
    """The tokenizer.json of the tokens artifact a model was trained on."""
    key = model.upstream["tokens"]
    path = Path(open_artifact("tokenize_corpus", key).path) / "tokenizer.json" if is_built("tokenize_corpus", key) \
        else None
    if path is None or not path.is_file():
        raise MissingArtifactError(f"the tokenizer.json of tokenize_corpus/{key} is missing; rebuild with: "
                                   "lmpipe run --only tokenize_corpus")
    return path


def cmd_export(args) -> int:
    """Export a model artifact as a Hugging Face Llama folder (safetensors + tokenizer)."""
    from stages.inference.export_hf import export_llama
    from stages.models.saved import load_model

    manifest = resolve_model(args.model, args)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not args.overwrite:
        what = "is a file" if not out_dir.is_dir() else "is not empty"
        raise ValueError(f"{out_dir} {what}: export into a new or empty folder, or pass --overwrite to replace "
                         "the files it writes")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: give a folder path")
    out = export_kept(manifest, out_dir) or export_llama(load_model(Path(manifest.path), "cpu"),
                                                        tokenizer_path(manifest), out_dir)
    if manifest.stage == "train_sae":
        print(f"exported {manifest.stage}/{manifest.key} to {out} (sae-lens layout: cfg.json, sae_weights.safetensors)")
        return 0
    print(f"exported {manifest.stage}/{manifest.key} to {out}\n"
          f"load with: AutoModelForCausalLM.from_pretrained('{out}'), AutoTokenizer.from_pretrained('{out}')")
    return 0


def export_kept(manifest: Manifest, out_dir: Path) -> Path | None:
    """Export what is not an lmpipe GPT: an SAE in the sae-lens layout, a frozen checkpoint kept by a role (its
    files as they were imported); None for a GPT (exported as Llama)."""
    import shutil

    from stages.models.hf_adapter import HF_DIR, HF_FORMAT
    from stages.models.sae_layouts import save_sae_lens
    from stages.models.saved import load_sae
    from storage.checkpoints import read_model_meta

    directory = Path(manifest.path)
    if manifest.stage == "train_sae":
        sae, meta = load_sae(directory)
        return save_sae_lens(out_dir, sae, int(meta["layer"]), model_name=f"lmpipe:{meta.get('reference_key')}")
    if read_model_meta(directory).get("format") != HF_FORMAT:
        return None
    shutil.copytree(directory / HF_DIR, out_dir, dirs_exist_ok=True)
    return out_dir


def cmd_generate(args) -> int:
    """Generate text from a trained model (greedy by default; --temperature > 0 samples)."""
    from tokenizers import Tokenizer

    from stages.inference.generate import generate_text
    from stages.models.saved import load_model

    manifest = resolve_model(args.model, args)
    model = load_model(Path(manifest.path), "cpu")
    tokenizer = Tokenizer.from_file(str(tokenizer_path(manifest)))
    if args.speculative:
        return _generate_speculative(model, tokenizer, args)
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0


def _generate_speculative(model, tokenizer, args) -> int:
    """Greedy self-speculative decoding: the text, tokens/s and tokens per forward (vs plain greedy timing)."""
    import time

    from stages.corpus.tokenizers import EOT
    from stages.inference.generate import generate
    from stages.inference.speculative import generate_speculative

    if model.num_future_tokens == 1:
        raise ValueError(f"model {args.model!r} has one prediction head, so nothing can be drafted: --speculative "
                         "needs a multi-token variant (num_future_tokens > 1, e.g. mtp2 or mtp4)")
    if args.temperature > 0:
        raise ValueError("--speculative decodes greedily (its output equals plain greedy decoding); drop "
                         "--temperature")
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise ValueError("prompt encodes to no tokens")
    eos_id = tokenizer.token_to_id(EOT)
    start = time.perf_counter()
    new_ids, stats = generate_speculative(model, prompt_ids, args.max_new_tokens, draft=args.draft, eos_id=eos_id)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain = generate(model, prompt_ids, args.max_new_tokens, eos_id=eos_id)
    plain_seconds = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(new_ids))
    print(f"\n{stats.new_tokens} tokens in {seconds:.3f}s ({stats.new_tokens / max(seconds, 1e-9):,.0f} tokens/s) "
          f"with {'adaptive drafts, up to ' if stats.adaptive else ''}{stats.draft} draft(s): "
          f"{stats.tokens_per_forward:.2f} tokens per forward after the prompt; "
          f"plain greedy {plain_seconds:.3f}s ({plain_seconds / max(seconds, 1e-9):.2f}x), "
          f"{'identical' if plain == new_ids else 'DIFFERENT'} output")
    return 0


def concept_description(model: Manifest, concept: int) -> dict:
    """The `concepts` table row of a concept of the SAE a concept model was trained with."""
    import pyarrow.parquet as pq

    key = model.upstream.get("concepts")
    path = Path(open_artifact("extract_concepts", key).path) / "concepts.parquet" \
        if key and is_built("extract_concepts", key) else None
    if path is None or not path.is_file():
        raise MissingArtifactError(f"no concepts table for {model.stage}/{model.key} (extract_concepts/{key}); "
                                   "rebuild with: lmpipe run --only extract_concepts")
    rows = pq.read_table(path, filters=[("concept_id", "=", concept)]).to_pylist()
    if not rows:
        raise ValueError(f"concept {concept} is not in {path}")
    return rows[0]


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int = 56) -> str:
    """Two titled texts in columns, wrapped to `width` characters."""
    import textwrap
    from itertools import zip_longest

    columns = [[title, "-" * len(title)] + textwrap.wrap(text.replace("\n", " / "), width)
               for title, text in (left, right)]
    return "\n".join(f"{a:<{width}}  |  {b}" for a, b in zip_longest(*columns, fillvalue=""))


def cmd_steer(args) -> int:
    """Generate with one CoCoMix concept amplified (scale > 0) or suppressed (< 0), beside scale 0."""
    from tokenizers import Tokenizer

    from stages.inference.generate import generate_text
    from stages.models.inserts import ConceptMixer
    from stages.models.saved import load_model

    manifest = resolve_model(args.model, args)
    model = load_model(Path(manifest.path), "cpu")
    mixers = [m for m in model.inserts.values() if isinstance(m, ConceptMixer)]
    if not mixers:
        raise ValueError(f"model {args.model!r} has no concept insert to steer; pick a CoCoMix variant "
                         "(one with `concepts` set, e.g. cocomix)")
    mixer = mixers[0]
    if not 0 <= args.concept < mixer.num_latents:
        raise ValueError(f"--concept {args.concept} is outside 0..{mixer.num_latents - 1}")
    about = concept_description(manifest, args.concept)
    print(f"concept {args.concept}: active on {about['frequency']:.2%} of train tokens, a label "
          f"{about['num_labelled']:,} times; top tokens: {', '.join(about['top_tokens']) or '-'}")
    for context in about["top_contexts"]:
        print(f"  context: {context!r}")
    tokenizer = Tokenizer.from_file(str(tokenizer_path(manifest)))
    texts = []
    for scale in (0.0, args.scale):
        mixer.steer = {args.concept: scale} if scale else {}
        texts.append((f"scale {scale:g}", args.prompt + generate_text(model, tokenizer, args.prompt,
                                                                      max_new_tokens=args.max_new_tokens)))
    print("\n" + side_by_side(*texts))
    return 0


def cmd_report(args) -> int:
    """Print the latest evaluation report (Markdown) and the paths of its plots."""
    node = plan(config_from_args(args))["evaluate"]
    report_dir = Path(open_artifact(node.stage, node.key).path) if node.is_built() else _latest("evaluate")
    if report_dir is None:
        raise MissingArtifactError("no evaluation report yet; build it with: lmpipe run")
    print((report_dir / "report.md").read_text())
    for plot in sorted(report_dir.glob("*.png")):
        print(f"plot: {plot}")
    return 0


def _latest(stage: str) -> Path | None:
    """The local directory of the stage's most recently finished artifact (any config), None when there is none."""
    built = [m for m in iter_manifests(stage=stage) if not isinstance(m, Exception)]
    return Path(open_artifact(stage, max(built, key=lambda m: m.created_at).key).path) if built else None


def add_commands(sub, config_args) -> None:
    """Register `export`, `generate` and `report` on the CLI."""
    export = sub.add_parser("export", help=cmd_export.__doc__)
    config_args(export)
    export.add_argument("model", help="variant name (ntp, slm), 'reference', 'teacher', 'base', 'sae' (sae-lens "
                        "layout), artifact key or directory")
    export.add_argument("out_dir", help="output folder (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty folder, replacing files")
    export.set_defaults(fn=cmd_export)
    generate = sub.add_parser("generate", help=cmd_generate.__doc__)
    config_args(generate)
    generate.add_argument("--model", default="ntp", help="variant name, 'reference', artifact key or directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--speculative", action="store_true",
                          help="greedy self-speculative decoding with a multi-token model's extra heads")
    generate.add_argument("--draft", type=int, default=None,
                          help="a fixed number of tokens drafted per forward with --speculative (default: adaptive, "
                          "up to every extra head, drafting less where drafts are rejected or do not pay)")
    generate.set_defaults(fn=cmd_generate)
    steer = sub.add_parser("steer", help=cmd_steer.__doc__)
    config_args(steer)
    steer.add_argument("--model", default="cocomix", help="a CoCoMix variant name, artifact key or directory")
    steer.add_argument("--concept", type=int, required=True, help="concept (SAE latent) id; see `concepts` in sql")
    steer.add_argument("--scale", type=float, default=1.0,
                       help="add scale * max|z| to the concept's predicted logit (< 0 suppresses)")
    steer.add_argument("--prompt", required=True)
    steer.add_argument("--max-new-tokens", type=int, default=40)
    steer.set_defaults(fn=cmd_steer)
    report = sub.add_parser("report", help=cmd_report.__doc__)
    config_args(report)
    report.set_defaults(fn=cmd_report)
