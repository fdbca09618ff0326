"""`lmpipe run`'s log: every record with its traceback in the run's file, one line per record in the terminal
(tracebacks there only with -v)."""

import io
import logging

import pytest

from flows import run_log


@pytest.fixture
def terminal():
    """A terminal handler on the root logger, as Prefect's logging setup (or basicConfig) leaves one."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    if run_log._handler is not None:
        root.removeHandler(run_log._handler)


def _log_a_failure():
    try:
        raise ValueError("shard train-001 is broken")
    except ValueError:
        logging.getLogger("stages.test").error("task run failed", exc_info=True)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_terminal_gets_one_line_and_the_file_the_traceback(terminal, tmp_path, monkeypatch, verbose):
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    path = run_log.start(verbose)
    _log_a_failure()
    assert path.parent == tmp_path / "_logs" and run_log.current() == path
    assert ("Traceback" in terminal.getvalue()) == verbose
    assert "ERROR stages.test: task run failed" in terminal.getvalue()
    text = path.read_text()
    assert "task run failed" in text and "Traceback" in text and "ValueError: shard train-001 is broken" in text


def test_a_second_run_in_the_process_leaves_the_first_ones_file(terminal, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path / "first"))
    first = run_log.start(False)
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path / "second"))
    second = run_log.start(False)
    _log_a_failure()
    assert "broken" not in first.read_text() and "broken" in second.read_text()
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    assert str(second) in files and str(first) not in files
    assert "Traceback" not in terminal.getvalue()
