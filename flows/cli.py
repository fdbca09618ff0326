"""`lmpipe` command line: run, status, sql, verify, config, server, serve, export, generate, report, inspect.

Prefect is imported only by the commands that need it (run, server, serve): status and sql stay fast.
"""

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from flows import run_log
from schemas.loading import ConfigError, load_config
from storage.artifacts import CorruptArtifactError, open_artifact, read_manifest


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="tiny | default | compare | full | continual | gpt2_small (default: the "
                        "last `lmpipe run`'s config when no --preset/--config/--set is given, else default)")
    parser.add_argument("--config", help="TOML/YAML/JSON file whose fields override the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set target.train.lr=3e-4 (repeatable)")


def _load(args):
    from flows.last_run import config_from_args

    return config_from_args(args)


def cmd_run(args) -> int:
    """Build the pipeline (or --only some stages) through Prefect."""
    from flows import multinode
    from stages.byom import check_inputs
    from stages.run_plan import RunPlan

    cfg = load_config(args.preset or "default", args.config, args.overrides)  # run: never the remembered one
    check_inputs(cfg)  # checkpoint, tokenizer and SAE folders (stages/byom.py): one-line errors before any compute
    run = RunPlan.of(cfg, args.only, args.force)  # an unknown stage is an error now, not after Prefect's start-up
    _check_store()  # so are a missing bucket and corpus files that are not there
    kind = args.task_runner or os.environ.get("LMPIPE_TASK_RUNNER")
    role = multinode.node_role(args, run, kind)  # several nodes: node 0 builds, the others join (flows/multinode.py)
    if not role.is_leader:
        return multinode.follow(run, role)
    run.check_input_files()
    if kind in RUNNER_PACKAGES and not importlib.util.find_spec(RUNNER_PACKAGES[kind][0]):
        package, extra = RUNNER_PACKAGES[kind]
        raise ValueError(f"--task-runner {kind} needs {package.replace('_', '-')}: pip install -e '.[{extra}]'")
    with multinode.leading(role):
        return _build(args, cfg, run)


def _build(args, cfg, run) -> int:
    """Node 0's (or the only node's) part of `lmpipe run`: build what the run selects and print the result."""
    from flows import env
    from flows.last_run import remember

    nodes = run.nodes
    remember(args, cfg)
    before = run.finished_stamps()
    started = time.perf_counter()
    if run.up_to_date(before):
        # nothing to build: no Prefect server, no flow run (a couple of seconds instead of 10-30)
        result = {name: read_manifest(nodes[name].stage, nodes[name].key).model_dump(mode="json")
                  for name in run.wanted}
    else:
        api_url = env.configure()
        if api_url is None and not args.verbose:
            # the temporary server is a child process writing to this terminal; stopped at exit while it still
            # records the last task-run events, it logs their cancellation with tracebacks (lmpipe -v shows them)
            os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        logging.getLogger(__name__).info("Prefect API: %s", api_url or "temporary local server (start `lmpipe "
                                         "server` in another shell to skip its ~10 s start-up and keep run history)")
        from flows.pipeline import pipeline, stop_directory
        from flows.watchdog import start_watchdog
        from stages.runtime.interrupt import install_handlers, stop_file_for_run

        logging.getLogger(__name__).info("log with tracebacks: %s", run_log.start(args.verbose))

        start_watchdog()  # ends Prefect's temporary server if this process dies, even by kill -9
        install_handlers()  # only `run` stops gracefully; server/serve keep the default signal behaviour
        if args.task_runner or args.parallel_tasks is not None or args.task_runner_address:
            from flows.task_runners import configured

            pipeline = pipeline.with_options(
                task_runner=configured(args.task_runner, args.parallel_tasks, args.task_runner_address))
        # before the task runner starts cluster workers, so they inherit it (flows/pipeline.py: stop_directory)
        with stop_file_for_run(stop_directory()):
            result = pipeline(config=cfg, only=args.only or None, force=args.force or None)
    rows = [{"node": name, "status": "cached" if before[name] == nodes[name].finished_stamp() else "built",
             "build s": result[name]["build_seconds"], "key": result[name]["key"], "path": result[name]["path"]}
            for name in nodes if name in result]
    print(f"done in {time.perf_counter() - started:.1f}s "
          f"({sum(r['status'] == 'built' for r in rows)} built, {sum(r['status'] == 'cached' for r in rows)} cached)")
    print(_format_table(rows, ["node", "status", "build s", "key", "path"], max_width=200))
    if "evaluate" in result:
        report = Path(open_artifact("evaluate", result["evaluate"]["key"]).path) / "report.md"
        print(f"\n{report.read_text()}\nreport: {report} (plots beside it; `lmpipe report` prints it again)")
    return 0


def _check_store() -> None:
    """An object-store root's bucket must exist: otherwise every artifact would look "not built" and a run would
    fail only after Prefect's start-up, without naming the bucket."""
    from storage.artifacts import object_store

    if store := object_store():
        store.check_root()


RUNNER_PACKAGES = {"dask": ("prefect_dask", "cluster"), "ray": ("prefect_ray", "ray")}
"""Task runner -> (the module it needs, the extra that installs it): checked before Prefect starts."""


def cmd_status(args) -> int:
    """Each node of the current config: key, built or not, size, created, headline numbers."""
    from flows.status import status_rows

    cfg = _load(args)
    _check_store()
    rows = status_rows(cfg)
    print(_format_table(rows, ["node", "key", "built", "size", "created", "summary"]))
    return 0


def cmd_sql(args) -> int:
    """Run SQL over the DuckDB catalog (no query: an interactive prompt)."""
    import duckdb

    from flows.status import catalog_for
    from storage.catalog import check_read_only

    catalog = catalog_for(_load(args), sandbox=args.sandbox)
    for line in catalog.warnings():  # damaged artifacts: their views are refused, the rest work
        print(f"lmpipe sql: warning: {line}", file=sys.stderr)
    try:
        if not args.query:
            return _sql_prompt(catalog)
        check_read_only(catalog, args.query)
        try:
            columns, values = catalog.rows(args.query)
        except duckdb.Error as err:
            raise ValueError(f"SQL error: {err}") from None
    finally:
        catalog.close()  # DuckDB removes its spill directory
    rows = [dict(zip(columns, row, strict=True)) for row in values]
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
    elif args.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(_format_table(rows, columns))
    return 0


def _sql_prompt(catalog) -> int:
    from storage.catalog import check_read_only, list_views

    views = list_views(catalog)
    print(("views: " + ", ".join(views) if views else "no views: " + next(iter(catalog.unavailable.values()), ""))
          + "\nend a query with ';'; Ctrl-D quits")
    buffer = ""
    while True:
        try:
            line = input("lmpipe> " if not buffer else "   ...> ")
        except EOFError:
            print()
            return 0
        buffer += line + "\n"
        if buffer.strip().endswith(";"):
            try:
                check_read_only(catalog, buffer)
                columns, values = catalog.rows(buffer)
                print(_format_table([dict(zip(columns, r, strict=True)) for r in values], columns))
            except Exception as err:  # noqa: BLE001 - an interactive prompt reports and continues
                print(f"error: {err}")
            buffer = ""


def cmd_verify(args) -> int:
    """Re-hash every finished artifact's files against its manifest, and check each one's upstream chain."""
    from storage.artifacts import chain_problems, iter_manifests, verify

    bad = stale = 0
    for manifest in iter_manifests():
        if isinstance(manifest, Exception):
            bad += 1
            print(f"CORRUPT {manifest}")
            continue
        problems, chain = verify(manifest), chain_problems(manifest)
        bad, stale = bad + bool(problems), stale + bool(chain and not problems)
        status = "CORRUPT" if problems else "STALE  " if chain else "OK     "
        print(f"{status} {manifest.stage}/{manifest.key}")
        for problem in problems + chain:
            print(f"    {problem}")
    if bad:
        print(f"{bad} corrupt artifact(s): rebuild with `lmpipe run --force STAGE`")
    if stale:
        print(f"{stale} artifact(s) built from upstream content that has changed since (`lmpipe run` rebuilds "
              "those of the current config)")
    return 1 if bad or stale else 0


def _store_line(store) -> str:
    """The object store's URL and whether it answers (a listing of its root)."""
    try:
        count = len(store.finished())
    except Exception as err:  # noqa: BLE001 - doctor reports any failure to reach the store
        return f"{store.url} (NOT reachable: {type(err).__name__}: {str(err)[:120]})"
    return f"{store.url} (reachable; {count} finished artifacts)"


def cmd_doctor(args) -> int:
    """Versions, devices, the artifact root and its free space, the Prefect API: what a bug report needs."""
    import importlib.metadata
    import os
    import platform
    import shutil

    from flows import env
    from flows.last_run import describe, last_run_path
    from storage.artifacts import artifact_root, object_store

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    import torch

    root = artifact_root()
    existing = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    usage = shutil.disk_usage(existing)
    record = env.server_record(root)
    api = os.environ.get("PREFECT_API_URL") or (json.loads(record.read_text())["api_url"] if record.is_file() else None)
    lines = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        *[(package, version(package)) for package in
          ("lmpipe", "torch", "prefect", "pyarrow", "duckdb", "datasets", "transformers", "tokenizers", "pydantic")],
        ("cpu threads", f"{torch.get_num_threads()} (os.cpu_count {os.cpu_count()})"),
        ("cuda", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"),
        *([("object store", _store_line(store))] if (store := object_store()) else []),
        ("artifact root" if store is None else "local mirror",
         f"{root} ({'exists' if root.exists() else 'not created yet'}; "
         f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f})"),
        ("last run", describe(json.loads(last_run_path(root).read_text())) if last_run_path(root).is_file()
         else "none"),
        ("prefect api", f"{api} ({'answering' if env.api_is_up(api) else 'NOT answering'})" if api
         else "none: `lmpipe run` starts a temporary local server (`lmpipe server` keeps one running)"),
    ]
    width = max(len(name) for name, _ in lines)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in lines))
    return 0


def cmd_config(args) -> int:
    """Print the resolved config as JSON."""
    print(_load(args).model_dump_json(indent=2))
    return 0


def _format_table(rows: list[dict], columns: list[str], max_width: int = 60) -> str:
    """A plain-text table (values cut to max_width characters)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        text = str(value)  # control characters (newline tokens) escaped so rows stay on one line
        return (text.encode("unicode_escape").decode() if not text.isprintable() else text)[:max_width]

    widths = {c: max([len(c)] + [len(cell(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines + [f"({len(rows)} rows)"])


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into a usage error naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (task runs at once), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    from flows import model_commands, serving
    from flows.inspector import serve as inspector

    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the pipeline (cached per stage)")
    _config_args(run)
    run.add_argument("--only", action="append", metavar="STAGE", help="build only this stage (upstream must exist)")
    run.add_argument("--force", action="append", metavar="STAGE", help="rebuild this stage even if cached")
    run.add_argument("--task-runner", choices=["thread", "dask", "ray"],
                     help="where task runs execute (default thread, or $LMPIPE_TASK_RUNNER): this process's thread "
                          "pool, a Dask or a Ray cluster (local, or --task-runner-address)")
    run.add_argument("--parallel-tasks", type=_positive_int, metavar="N",
                     help="task runs at once (thread pool size / local Dask workers / local Ray CPUs; default 2)")
    run.add_argument("--task-runner-address", metavar="URL",
                     help="an existing cluster: a Dask scheduler (tcp://host:8786) or Ray head (ray://host:10001)")
    from flows.multinode import add_arguments

    add_arguments(run)
    run.set_defaults(fn=cmd_run)
    for name, fn in (("status", cmd_status), ("config", cmd_config)):
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0])
        _config_args(p)
        p.set_defaults(fn=fn)
    sql = sub.add_parser("sql", help=cmd_sql.__doc__)
    _config_args(sql)
    sql.add_argument("query", nargs="?", help="SQL; omit for an interactive prompt")
    fmt = sql.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    fmt.add_argument("--json", action="store_true", help="print JSON")
    sql.add_argument("--sandbox", action="store_true",
                     help="read only the artifacts: no other file, no network, no extension installs (for queries "
                          "from a web page)")
    sql.set_defaults(fn=cmd_sql)
    sub.add_parser("verify", help=cmd_verify.__doc__).set_defaults(fn=cmd_verify)
    sub.add_parser("doctor", help=cmd_doctor.__doc__.splitlines()[0]).set_defaults(fn=cmd_doctor)
    serving.add_commands(sub, _config_args)
    model_commands.add_commands(sub, _config_args)
    inspector.add_command(sub, _config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmpipe` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    from stages.runtime.interrupt import Interrupted

    try:
        return args.fn(args)
    except Interrupted as err:
        print(f"lmpipe: {err}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("lmpipe: interrupted (finished artifacts are intact; training resumes from its last checkpoint)",
              file=sys.stderr)
        return 130
    except (ConfigError, ValueError, FileNotFoundError, CorruptArtifactError) as err:
        print(f"lmpipe: error: {err}{_traceback_hint(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line for the user; the traceback with -v
        if args.verbose:
            raise
        hint = _traceback_hint(err) or "\n(run `lmpipe -v ...` for the traceback; finished artifacts are intact)"
        print(f"lmpipe: error: {type(err).__name__}: {str(err).strip() or repr(err)}{hint}", file=sys.stderr)
        return 1
    finally:
        run_log.finish()


def _traceback_hint(err: Exception) -> str:
    """Where the traceback of an error is, when a run log was started in this process ('' otherwise)."""
    if run_log.current() is None:  # started by `run` once it starts Prefect
        return ""
    run_log.record_error(err)
    return f"\n(traceback: {run_log.current()}; finished artifacts are intact)"


if __name__ == "__main__":
    sys.exit(main())
