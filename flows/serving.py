"""`lmpipe server` (a local Prefect server with UI) and `lmpipe serve --cron` (scheduled pipeline + stage flows)."""

import json
import os
import signal
import subprocess
import sys

from schemas.loading import load_config


def cmd_server(args) -> int:
    """Start a local Prefect server (UI + API) with its data under the artifact root; Ctrl-C stops it."""
    from flows import env

    env.configure()
    api_url = f"http://{args.host}:{args.port}/api"
    record = env.server_record()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"api_url": api_url, "pid": os.getpid()}))
    print(f"Prefect UI:  http://{args.host}:{args.port}\n"
          f"lmpipe runs from this artifact root use it automatically (recorded in {record});\n"
          f"elsewhere: export PREFECT_API_URL={api_url}", flush=True)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", args.host, "--port", str(args.port)]
    # the UI asks the server where its API is: without this it points at the default port 4200 ("Oops.
    # Something went wrong" in the browser) whenever --port or --host differ
    child_env = dict(os.environ, PREFECT_UI_API_URL=api_url)
    from stages.runtime.interrupt import die_with_parent

    # the server gets SIGTERM when this process dies (even by kill -9); SIGTERM here is passed on
    child = subprocess.Popen(command, env=child_env, preexec_fn=die_with_parent)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        return 0
    finally:
        record.unlink(missing_ok=True)


def cmd_serve(args) -> int:
    """Serve the pipeline on a cron schedule plus one deployment per stage (config as a UI form)."""
    from flows import env

    cfg = load_config(args.preset or "default", args.config, args.overrides)
    if not env.configure():
        print("lmpipe serve needs a running Prefect server: start `lmpipe server` in another shell first",
              file=sys.stderr)
        return 2
    from prefect import serve

    from flows.pipeline import STAGE_FLOWS, pipeline

    params = {"config": cfg.model_dump(mode="json")}
    deployments = [pipeline.to_deployment(name="scheduled", cron=args.cron, parameters=params)]
    deployments += [stage_flow.to_deployment(name="on-demand", parameters=params)
                    for stage_flow in STAGE_FLOWS.values()]
    print(f"serving lmpipe/scheduled ({args.cron}) and {len(STAGE_FLOWS)} stage flows; Ctrl-C stops", flush=True)
    serve(*deployments)
    return 0


def add_commands(sub, config_args) -> None:
    """Register `server` and `serve` on the CLI."""
    server = sub.add_parser("server", help=cmd_server.__doc__.splitlines()[0])
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=4200)
    server.set_defaults(fn=cmd_server)
    serve_parser = sub.add_parser("serve", help=cmd_serve.__doc__)
    config_args(serve_parser)
    serve_parser.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *" (daily at 03:00)')
    serve_parser.set_defaults(fn=cmd_serve)
