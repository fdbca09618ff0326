"""The main thread's wait on a run's task runs: a failed task ends the run, and so does a stop signal.

Prefect leaves a task whose upstream failed in the state Pending("NotReady") for good, and its future's wait()
returns at once, so waiting "until it is no longer pending" spins for ever. `RunFutures` tracks every task run
the flow submits and waits on them together, in short slices (signal handlers run in this main thread between
them). The first task run that fails, or a stop signal, stops the run's other task runs at their next safe point
(through the run's stop file, which cluster workers see too), waits until every one has ended, then raises the
failed task's own error (or Interrupted): finished artifacts, shards and training checkpoints are kept, and the
same command resumes.
"""

import logging
import queue

from prefect.futures import PrefectFuture

from schemas.manifest import Manifest
from stages.runtime import interrupt

log = logging.getLogger(__name__)

SLICE_S = 0.5
"""Longest wait between two looks at the stop flag."""


class RunFutures:
    """The task runs of one flow run, resolved in the main thread (see the module docstring)."""

    def __init__(self, stop_file: str | None):
        self.stop_file = stop_file
        """The run's stop file (interrupt.stop_file_for_run): created here to stop the other task runs."""
        self._names: dict[PrefectFuture, str] = {}  # every tracked task run, by its name
        self._finished: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()  # fed by done callbacks
        self._done: set[PrefectFuture] = set()
        self._failed: PrefectFuture | None = None

    def track(self, future: PrefectFuture, name: str) -> PrefectFuture:
        """Watch a submitted task run (`name`: the task run's, for the log); returns it."""
        self._names[future] = name
        future.add_done_callback(self._finished.put)  # called in a worker or client thread: only a queue put
        return future

    def resolve(self, value: Manifest | PrefectFuture) -> Manifest:
        """A manifest as it is, or a task run's manifest once it finished. Raises the run's first failure, from
        whichever task run, as soon as there is one (after stopping the others), or Interrupted after a stop."""
        if not isinstance(value, PrefectFuture):
            return value
        while value not in self._done:
            if self._failed is not None or interrupt.STOP.is_set():
                self._end_run()
            self._collect(SLICE_S)
        if value.state.is_completed():
            return value.result()
        self._end_run()  # it failed, or its upstream did (NotReady): the first failure is the run's error

    def _collect(self, timeout_s: float) -> None:
        """Take the task runs that finished (waiting up to timeout_s for the first), noting the first failure."""
        try:
            future = self._finished.get(timeout=timeout_s)
        except queue.Empty:
            return
        while True:
            future.wait()  # done already: this only records its final state
            self._done.add(future)
            state = future.state
            upstream_failed = state.is_pending() and state.name == "NotReady"
            if self._failed is None and not state.is_completed() and not upstream_failed:
                self._failed = future
            try:
                future = self._finished.get_nowait()
            except queue.Empty:
                return

    def _end_run(self) -> None:
        """Stop the task runs still going, wait for every one to end, then raise the first failure's error."""
        running = len(self._names) - len(self._done)
        if running:
            why = "a stop signal" if self._failed is None else f"{self._names[self._failed]} failed"
            log.warning("%s: stopping the run's other %d task run(s) at their next safe point (finished artifacts, "
                        "shards and training checkpoints are kept)", why, running)
            if self.stop_file:
                interrupt.announce_stop(self.stop_file)
            while len(self._done) < len(self._names):
                self._collect(SLICE_S)
        if self._failed is not None:
            self._failed.result()  # raises the task's own exception
            raise RuntimeError(f"task run {self._failed.task_run_id} ended as {self._failed.state!r}")
        if interrupt.STOP.is_set():
            raise interrupt.Interrupted("stopped by a signal before the run finished; finished artifacts are kept, "
                                        "run the same command again to go on")
        raise RuntimeError("a task run ended without a result, yet none failed")
