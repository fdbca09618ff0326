"""A watchdog process that ends a parent's child processes when the parent dies, even by `kill -9`.

`lmpipe run` starts Prefect's temporary server as a child process (uvicorn); if `lmpipe run` is killed with
SIGKILL, nothing in it can stop that server, which would keep running (~200 MB) with no owner. The watchdog is a
separate small process: every POLL_S it records the parent's descendants (from /proc); once the parent is gone
(it gets SIGTERM through PR_SET_PDEATHSIG, and polls as a fallback) it sends SIGTERM to every recorded
descendant that is still alive, then SIGKILL to those left after GRACE_S. Linux only; elsewhere it is not
started.

Usage: python -m flows.watchdog PARENT_PID
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stages.runtime.interrupt import die_with_parent

POLL_S = 0.5
GRACE_S = 3.0


def descendants(pid: int) -> set[int]:
    """Every live descendant of pid (children of children, ...), read from /proc/<pid>/task/*/children."""
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def terminate(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL after GRACE_S for whatever is still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [pid for pid in pids if alive(pid)]:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.1)


def watch(parent: int) -> None:
    """Record the parent's descendants until it is gone, then end them."""
    parent_gone = False

    def on_parent_death(signum, frame):
        nonlocal parent_gone
        parent_gone = True

    signal.signal(signal.SIGTERM, on_parent_death)
    die_with_parent()
    recorded: set[int] = set()
    me = os.getpid()
    while not parent_gone and alive(parent) and os.getppid() == parent:
        recorded |= descendants(parent) - {me}
        recorded = {pid for pid in recorded if alive(pid)}
        time.sleep(POLL_S)
    terminate(recorded - {me})


def start_watchdog() -> subprocess.Popen | None:
    """Start a watchdog for this process (None where there is no /proc)."""
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        return None
    return subprocess.Popen([sys.executable, "-m", "flows.watchdog", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
