"""Progress of one pass over a corpus: documents, MB of text and tokens so far, logged every few seconds."""

import logging
import time

from stages.runtime.progress import peak_rss_mib

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
"""Seconds between two progress lines of a pass."""


class Progress:
    """Running totals of one pass (e.g. `read`, `encode`), logged at most every LOG_EVERY_S and at the end."""

    def __init__(self, name: str, every_s: float = LOG_EVERY_S):
        self.name = name
        self.every_s = every_s
        self.documents = self.text_bytes = self.tokens = 0
        self.started = self.last_logged = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds since the pass started."""
        return time.perf_counter() - self.started

    def add(self, documents: int, text_bytes: int, tokens: int = 0) -> None:
        """Count a finished batch; log the totals if the last line is older than every_s."""
        self.documents += documents
        self.text_bytes += text_bytes
        self.tokens += tokens
        if time.perf_counter() - self.last_logged >= self.every_s:
            self._log("")

    def done(self) -> None:
        """Log the pass's final totals."""
        self._log(" done")

    def _log(self, suffix: str) -> None:
        seconds = max(self.seconds, 1e-9)
        counts = []
        if self.documents:
            megabytes = self.text_bytes / 1e6
            counts.append(f"{self.documents:,} documents, {megabytes:.1f} MB of text ({megabytes / seconds:.2f} MB/s)")
        if self.tokens:
            counts.append(f"{self.tokens:,} tokens ({self.tokens / seconds:,.0f} tokens/s)")
        log.info("%s%s: %s in %.1fs; peak RSS %.0f MiB", self.name, suffix, ", ".join(counts) or "nothing", seconds,
                 peak_rss_mib())
        self.last_logged = time.perf_counter()
