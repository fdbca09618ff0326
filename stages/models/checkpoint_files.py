"""The files of a checkpoint, SAE or tokenizer folder that a pipeline reads, and their content digest: what an
artifact key of a role that starts from such a folder hashes (stages/byom.py puts it into the role's config).

Each file is hashed at most once per process while its (path, size, mtime_ns) stays the same: a 2 GB checkpoint
is read once per run however often the DAG is planned. Like storage/checked_files.py's cache this is a shortcut,
not a proof: a file rewritten with its size and mtime put back keeps its old digest until the next process.
"""

import hashlib
import os
import threading
from pathlib import Path

from storage.store import sha256_of

READ_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "cfg.json")
"""Named files a folder contributes when present (the model or SAE config, tokenizer files)."""
READ_SUFFIXES = (".safetensors", ".safetensors.index.json")
"""And every file with one of these endings (weights, shard indexes)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
"""What a tokenizer read from a checkpoint folder depends on (config.json: its eos_token_id)."""

_DIGESTS: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def folder_files(path: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """The files of `path` a pipeline reads (a single file is itself), sorted by name; `names` narrows a folder
    to those names."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder; give the path of a Hugging Face checkpoint folder")
    return sorted(p for p in path.iterdir() if p.is_file() and (
        p.name in names if names is not None else (p.name in READ_FILES or p.name.endswith(READ_SUFFIXES))))


def file_sha256(path: Path) -> str:
    """The sha256 of one file, from the in-process cache while its size and mtime are unchanged."""
    stat = os.stat(path)
    stamp = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if stamp in _DIGESTS:
            return _DIGESTS[stamp]
    with open(path, "rb") as f:
        digest = sha256_of(f, chunk_bytes=1 << 24)
    with _LOCK:
        _DIGESTS[stamp] = digest
    return digest


def folder_digest(path: str | Path, names: tuple[str, ...] | None = None) -> str:
    """One sha256 over the names and contents of folder_files(path, names): changes when any of them does."""
    lines = [f"{p.name}:{file_sha256(p)}" for p in folder_files(path, names)]
    if not lines:
        raise ValueError(f"{path}: the folder holds none of the files a checkpoint has (config.json, *.safetensors)")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def hashed_files() -> int:
    """Files hashed so far in this process (a test checks an unchanged file is hashed once)."""
    return len(_DIGESTS)
