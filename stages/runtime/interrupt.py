"""Graceful stop on SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C): long loops finish the current step, save
a checkpoint and raise `Interrupted`, which says how to resume. A second signal stops at once.

The flag is process-wide, so loops running in worker threads (Prefect's thread pool) see it; handlers can only
be installed from the main thread (`install_handlers`: by the CLI, and again inside the pipeline flow, because
Prefect's flow engine installs its own SIGTERM handler when a flow starts). Task runs in other processes (Dask or
Ray workers) hear of it through the run's stop file: the handler creates it, and `requested()` in any process
that knows its name sees it. The name reaches a worker twice: as $LMPIPE_STOP_FILE (inherited by the workers of a
local cluster and by training processes) and as a parameter of every task run, which `watching` makes the
stop file of that task run's thread (workers started elsewhere, serving several runs). With an object-store
root the stop file is an object in the bucket (`<root>/_stop/run-...`), so workers on other machines see it;
they look at most every STOP_POLL_SECONDS. A stop file stops the task runs watching it, not the whole process.
"""

import contextvars
import ctypes
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from storage.store import filesystem, is_url

log = logging.getLogger(__name__)

STOP = threading.Event()
PR_SET_PDEATHSIG = 1
STOP_FILE_ENV = "LMPIPE_STOP_FILE"
"""The environment variable naming a run's stop file (set by `lmpipe run`, inherited by its cluster workers)."""
STOP_POLL_SECONDS = 2.0
"""How often a stop file in an object store is looked at (a local one: at every check, one stat)."""
_last_polls: dict[str, float] = {}
"""When each stop file in an object store was last looked at (task runs of several runs share a process)."""
_TASK_STOP_FILE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmpipe_stop_file", default=None)
_found_stop_files: set[str] = set()


class Interrupted(RuntimeError):
    """A loop stopped at a safe point because a stop signal arrived; its message says how to resume."""


def install_handlers() -> None:
    """SIGTERM/SIGINT set STOP (first signal) or raise KeyboardInterrupt (second). Main thread only; a no-op
    elsewhere. Python runs handlers in the main thread between bytecodes, so a main thread that waits on worker
    threads must wait in short slices (flows/pipeline.py does)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if STOP.is_set():
            log.warning("second %s: stopping now", name)
            raise KeyboardInterrupt
        log.warning("%s: stopping at the next safe point (training: after the current step, with a checkpoint); "
                    "send it again to stop at once", name)
        STOP.set()
        if stop_file := os.environ.get(STOP_FILE_ENV):
            announce_stop(stop_file)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when our parent dies (Linux, best effort: glibc's prctl); also usable as a
    subprocess preexec_fn, so that a child (a training worker, a Prefect server) dies with the process that
    started it, even when that one is killed with kill -9."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def announce_stop(location: str) -> None:
    """Create the stop file; for an object store in a background thread (a signal handler must not block on the
    network), logged if it fails."""
    fs, path = filesystem(location)
    if not is_url(location):
        fs.touch(path)
        return

    def put() -> None:
        try:
            fs.pipe_file(path, b"stop")
        except Exception as err:  # noqa: BLE001 - the local stop goes on; only remote workers miss it
            log.warning("could not write the stop file %s (workers on other machines train on): %s", location, err)

    threading.Thread(target=put, name="announce-stop", daemon=True).start()


@contextmanager
def stop_file_for_run(directory: str) -> Iterator[str]:
    """Set $LMPIPE_STOP_FILE to a fresh file name under `directory` (a local path, or the object-store root's
    `_stop` URL) for the duration of a run (before its task runner starts cluster workers, so they inherit it);
    the file is removed afterwards."""
    directory = str(directory).rstrip("/")
    fs, base = filesystem(directory)
    if not is_url(directory):
        fs.makedirs(base, exist_ok=True)
    location = f"{directory}/run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get(STOP_FILE_ENV)
    os.environ[STOP_FILE_ENV] = location
    try:
        yield location
    finally:
        with suppress(FileNotFoundError):
            fs.rm_file(filesystem(location)[1])
        if previous is None:
            os.environ.pop(STOP_FILE_ENV, None)
        else:
            os.environ[STOP_FILE_ENV] = previous


@contextmanager
def watching(location: str | None) -> Iterator[None]:
    """Within this block (a task run), `requested()` in this thread also watches the run's stop file `location`
    (None: only $LMPIPE_STOP_FILE)."""
    token = _TASK_STOP_FILE.set(location)
    try:
        yield
    finally:
        _TASK_STOP_FILE.reset(token)


def run_stop_file() -> str | None:
    """The stop file of the run this code works for: the task run's, else $LMPIPE_STOP_FILE."""
    return _TASK_STOP_FILE.get() or os.environ.get(STOP_FILE_ENV)


def requested() -> bool:
    """Was a stop requested: a signal to this process, or the run's stop file (a signal to the `lmpipe run` that
    submitted this task run)? Cheap enough for every training step: one stat, or for a stop file in an object
    store one request every STOP_POLL_SECONDS."""
    if STOP.is_set():
        return True
    stop_file = run_stop_file()
    if not stop_file:
        return False
    if stop_file not in _found_stop_files and _stop_file_exists(stop_file):
        _found_stop_files.add(stop_file)
    return stop_file in _found_stop_files


def _stop_file_exists(location: str) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    now = time.monotonic()
    if now - _last_polls.get(location, float("-inf")) < STOP_POLL_SECONDS:
        return False
    _last_polls[location] = now
    fs, path = filesystem(location)
    try:
        return fs.exists(path)
    except OSError as err:  # an unreachable store must not stop training: the next poll tries again
        log.warning("could not look for the stop file %s: %s", location, err)
        return False


def check(what: str) -> None:
    """Raise Interrupted when a stop was requested; `what` says what was saved and how to go on."""
    if requested():
        raise Interrupted(f"stopped by a signal: {what}")
