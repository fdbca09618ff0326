"""The log file of one `lmpipe run`, and a terminal that shows each log record as one line.

Prefect logs a failed task run's traceback, and the flow run's again, above lmpipe's own one-line error. The
file `<root>/_logs/run-<time>-<pid>.log` gets every record with its traceback; the terminal gets the records
without tracebacks (with `lmpipe -v`: with them), and the final error line names the file.
"""

import logging
import os
import time
from pathlib import Path

from storage.artifacts import artifact_root

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_file_logger = logging.getLogger("lmpipe.run_log")
"""Writes only to the run's file (lmpipe's own error, which the terminal gets as one line already)."""
_file_logger.propagate = False
_current: Path | None = None
_handler: logging.FileHandler | None = None


class _WithoutTraceback(logging.Formatter):
    """Another formatter's output of a record, without the record's traceback or stack."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # other handlers still get them: restored below
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def start(verbose: bool) -> Path:
    """Send every log record to a new file under the artifact root (instead of an earlier run's in this process);
    unless verbose, the terminal's handlers leave tracebacks out. Call after `import prefect` (its logging setup
    replaces the root logger's handlers)."""
    global _current, _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _file_logger.removeHandler(_handler)
        _handler.close()
    _current = artifact_root() / "_logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    _current.parent.mkdir(parents=True, exist_ok=True)
    _handler = logging.FileHandler(_current, encoding="utf-8")
    _handler.setFormatter(logging.Formatter(FORMAT))
    if not verbose:
        for terminal in root.handlers:
            if isinstance(terminal, logging.StreamHandler) and not isinstance(terminal, logging.FileHandler) \
                    and not isinstance(terminal.formatter, _WithoutTraceback):
                terminal.setFormatter(_WithoutTraceback(terminal.formatter))
    root.addHandler(_handler)
    _file_logger.addHandler(_handler)
    return _current


def finish() -> None:
    """Close the run's file: a later command in the same process (tests, notebooks) starts without one."""
    global _current, _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _file_logger.removeHandler(_handler)
        _handler.close()
    _current = _handler = None


def current() -> Path | None:
    """The file of the run in progress in this process (None before `start`)."""
    return _current


def record_error(err: BaseException) -> None:
    """Write lmpipe's final error, with its traceback, to the run's file only."""
    if _current is not None:
        _file_logger.error("lmpipe run ended with %s: %s", type(err).__name__, err, exc_info=err)
