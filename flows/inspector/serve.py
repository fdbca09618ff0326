"""`lmpipe inspect`: open a run's catalog (sandboxed), its tokenizer and plots, and serve the inspector."""

import logging
import sys
from functools import partial

from flows.inspector.data import RunData
from flows.inspector.pieces import TokenPieces
from schemas.configs import PipelineConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
"""Where `lmpipe inspect` listens unless --port says otherwise (the Prefect link points here)."""


def open_run(cfg: PipelineConfig, max_tokens: int = 20_000) -> RunData:
    """The inspector's data for a config's artifacts: the sandboxed catalog, the tokenizer of its
    tokenize_corpus artifact and the PNGs of its evaluate artifact, read in place (a local root or a bucket)."""
    from tokenizers import Tokenizer

    from flows.status import catalog_for
    from stages.dag import plan
    from storage.artifacts import artifact_store

    catalog, nodes, store = catalog_for(cfg, sandbox=True), plan(cfg), artifact_store()
    pieces, plots = None, {}
    tokens = nodes["tokenize_corpus"]
    if store.is_finished(tokens.stage, tokens.key):
        text = store.fs.cat_file(store.path(tokens.stage, tokens.key, "tokenizer.json")).decode()
        pieces = TokenPieces(Tokenizer.from_str(text))
    evaluate = nodes.get("evaluate")
    if evaluate is not None and store.is_finished(evaluate.stage, evaluate.key):
        for path in store.files(store.path(evaluate.stage, evaluate.key), "*.png"):
            plots[path.rsplit("/", 1)[-1]] = partial(store.fs.cat_file, store.path(
                evaluate.stage, evaluate.key, path.rsplit("/", 1)[-1]))
    return RunData(catalog, pieces, plots, max_tokens)


def cmd_inspect(args) -> int:
    """Serve the token and concept inspector of a run on 127.0.0.1 (default: the last run's config)."""
    import uvicorn

    from flows.cli import _load
    from flows.inspector.app import create_app

    data = open_run(_load(args), args.max_tokens)
    for line in data.catalog.warnings():
        print(f"lmpipe inspect: warning: {line}", file=sys.stderr)
    if not data.has("documents"):
        print(f"lmpipe inspect: {data.why_missing('documents')} (the page says so too)", file=sys.stderr)
    print(f"lmpipe inspect: http://127.0.0.1:{args.port}/ (Ctrl-C stops it)", flush=True)
    try:
        uvicorn.run(create_app(data), host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        data.catalog.close()
    return 0


def add_command(sub, config_args) -> None:
    """The `inspect` subcommand."""
    inspect = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    config_args(inspect)
    inspect.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    inspect.add_argument("--max-tokens", type=int, default=20_000, metavar="N",
                         help="tokens of a document the page loads at most (default 20000)")
    inspect.set_defaults(fn=cmd_inspect)


def publish_link(port: int = DEFAULT_PORT) -> None:
    """A Prefect link artifact to the inspector (in a flow run: it shows with the run's artifacts)."""
    from prefect.artifacts import create_link_artifact

    create_link_artifact(key="lmpipe-inspector", link=f"http://127.0.0.1:{port}/", link_text="token and concept "
                         "inspector", description="Start it with `lmpipe inspect` (the config of the last run), "
                         "then open the link: documents coloured by per-token loss, selection and concepts; "
                         "SAE latent dashboards; the run's plots.")
