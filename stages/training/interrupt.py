"""Graceful stop on SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C): long loops finish the current step, save
a checkpoint and raise `Interrupted`, which says how to resume. A second signal stops at once.

The flag is process-wide, so loops running in worker threads (Prefect's thread pool) see it; handlers can only
be installed from the main thread (`install_handlers`: by the CLI, and again inside the pipeline flow, because
Prefect's flow engine installs its own SIGTERM handler when a flow starts).
"""

import ctypes
import logging
import signal
import threading

log = logging.getLogger(__name__)

STOP = threading.Event()
PR_SET_PDEATHSIG = 1


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


def check(what: str) -> None:
    """Raise Interrupted when a stop was requested; `what` says what was saved and how to go on."""
    if STOP.is_set():
        raise Interrupted(f"stopped by a signal: {what}")
