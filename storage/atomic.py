"""The one write-temp-then-rename helper: readers never see half a file under a final name.

The temporary name carries the process id and a random suffix, so two processes writing the same file never
rename each other's temporary file; a failed write removes its temporary file.
"""

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMP_NAME = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")


def remove_leftover_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files a killed writer left under `directory` (only safe while nobody else writes
    there, e.g. under the artifact's build lock); returns what was removed."""
    leftovers = [path for path in Path(directory).rglob(".*.tmp") if _TEMP_NAME.match(path.name) and path.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


@contextmanager
def atomic_path(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path` (after fsync when asked)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
