"""Graceful stop on SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C): long loops finish the current step, save
a checkpoint and raise `Interrupted`, which says how to resume. A second signal stops at once.

The flag is process-wide, so loops running in worker threads (Prefect's thread pool) see it; handlers can only
be installed from the main thread (`install_handlers`: by the CLI, and again inside the pipeline flow, because
Prefect's flow engine installs its own SIGTERM handler when a flow starts). Task runs in other processes (Dask or
Ray workers) hear of it through the run's stop file ($LMPIPE_STOP_FILE, which workers inherit): the handler
creates it, and `requested()` in any process that has the variable sees it.
"""

import ctypes
import logging
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STOP = threading.Event()
PR_SET_PDEATHSIG = 1
STOP_FILE_ENV = "LMPIPE_STOP_FILE"
"""The environment variable naming a run's stop file (set by `lmpipe run`, inherited by its cluster workers)."""


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
            Path(stop_file).touch()

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


@contextmanager
def stop_file_for_run(directory: Path) -> Iterator[Path]:
    """Set $LMPIPE_STOP_FILE to a fresh file name under `directory` for the duration of a run (before its task
    runner starts cluster workers, so they inherit it); the file is removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get(STOP_FILE_ENV)
    os.environ[STOP_FILE_ENV] = str(path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        if previous is None:
            os.environ.pop(STOP_FILE_ENV, None)
        else:
            os.environ[STOP_FILE_ENV] = previous


def requested() -> bool:
    """Was a stop requested: a signal to this process, or the run's stop file (a signal to the `lmpipe run` that
    submitted this process's task run)? Cheap enough for every training step (one stat)."""
    if not STOP.is_set() and (stop_file := os.environ.get(STOP_FILE_ENV)) and os.path.exists(stop_file):
        STOP.set()
    return STOP.is_set()


def check(what: str) -> None:
    """Raise Interrupted when a stop was requested; `what` says what was saved and how to go on."""
    if requested():
        raise Interrupted(f"stopped by a signal: {what}")
