"""Prefect settings that must be in the environment before `import prefect`.

Prefect's own state (home, database, result records) lives under the artifact root unless the user set
PREFECT_HOME / PREFECT_API_URL themselves. A server started by `lmpipe server` records its API URL in
<root>/_prefect/server.json; runs use it when it answers, else Prefect's temporary local server.
"""

import json
import os
import urllib.request
from pathlib import Path

from storage.artifacts import artifact_root


def prefect_dir(root: Path | None = None) -> Path:
    """<root>/_prefect: Prefect home, results and the server record."""
    return (root or artifact_root()) / "_prefect"


def server_record(root: Path | None = None) -> Path:
    """The file where `lmpipe server` writes its API URL."""
    return prefect_dir(root) / "server.json"


def api_is_up(api_url: str, timeout_s: float = 0.5) -> bool:
    """True when a Prefect API answers /health."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def configure(root: Path | None = None) -> str | None:
    """Set Prefect env defaults (home and results under the root, analytics off, stage loggers shown).

    Returns the API URL of a running `lmpipe server`, if one is recorded and answering; a PREFECT_API_URL the
    user set that does not answer is a ValueError within seconds.
    """
    base = prefect_dir(root)
    defaults = {
        "PREFECT_HOME": str(base / "home"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(base / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "stages,storage,flows",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        # a server that dies mid-run fails the run in about a minute, not after ~11 minutes of retries
        "PREFECT_API_REQUEST_TIMEOUT": "20",
        "PREFECT_CLIENT_MAX_RETRIES": "2",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    for name in ("PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):  # prefect does not create parents
        Path(os.environ[name]).expanduser().mkdir(parents=True, exist_ok=True)
    if "PREFECT_API_URL" in os.environ:
        api_url = os.environ["PREFECT_API_URL"]
        if not api_is_up(api_url, timeout_s=3.0):
            raise ValueError(f"the Prefect API at PREFECT_API_URL={api_url} does not answer; start it (`lmpipe "
                             "server`) or unset PREFECT_API_URL to run on a temporary local server (finished "
                             "artifacts are untouched)")
        return api_url
    record = server_record(root)
    if record.is_file():
        api_url = json.loads(record.read_text())["api_url"]
        if api_is_up(api_url):
            os.environ["PREFECT_API_URL"] = api_url
            return api_url
    return None
