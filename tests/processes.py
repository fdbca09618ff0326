"""Helpers of the tests that start real `lmpipe` processes: their environment, a free port, polling."""

import json
import os
import time
import urllib.request
from pathlib import Path

from stages.training.distributed import free_port  # noqa: F401  (the tests' free port, one helper)

REPO = Path(__file__).resolve().parents[1]


def lmpipe_env(root: Path) -> dict:
    """This environment without PREFECT_* settings, with LMPIPE_ROOT=root and the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"LMPIPE_ROOT": str(root), "DO_NOT_TRACK": "1", "PYTHONPATH": str(REPO)}


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    """predicate()'s first truthy value (an OSError counts as not yet); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def prefect_api(base: str, path: str, body: dict | None = None):
    """GET (or with a body, POST) one path of a Prefect API at `base` (e.g. http://127.0.0.1:4200/api); the JSON."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")
