"""Writing and reading a token stream's .npy file chunk by chunk, so a stream never has to fit in memory.

The file is a normal 1-D int32 .npy (what `np.save` writes for the same array, byte for byte), so
`np.load(path, mmap_mode="r")` and storage.windows.TokenWindows read it unchanged. The header is written first
for length 0 and rewritten in place with the final length when the writer closes; numpy pads every header
for a 21-digit length, so the rewrite never changes the header's size (asserted).
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

STREAM_DTYPE = np.dtype("<i4")
"""Token ids are stored little-endian int32, as np.save stores an int32 array on this platform."""


def _write_header(handle, num_tokens: int) -> int:
    """Write the .npy header of a 1-D int32 array of num_tokens at the handle's position; returns its size."""
    start = handle.tell()
    header = {"descr": npy_format.dtype_to_descr(STREAM_DTYPE), "fortran_order": False, "shape": (num_tokens,)}
    npy_format.write_array_header_1_0(handle, header)
    return handle.tell() - start


class TokenStreamWriter:
    """Appends int32 token chunks to a .npy file; `close` (or leaving the `with` block) fixes its length."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.num_tokens = 0
        self._handle = open(self.path, "wb")  # closed by close()
        self._header_size = _write_header(self._handle, 0)

    def append(self, tokens: np.ndarray) -> None:
        """Append a chunk of token ids (any integer dtype whose values fit int32)."""
        chunk = np.asarray(tokens)
        if chunk.ndim != 1:
            raise ValueError(f"{self.path}: token chunks are 1-D, got shape {chunk.shape}")
        if chunk.dtype != STREAM_DTYPE:
            chunk = chunk.astype(STREAM_DTYPE, casting="same_kind")
        self._handle.write(chunk.tobytes())
        self.num_tokens += len(chunk)

    def close(self) -> None:
        """Rewrite the header with the final length and close the file (a second call does nothing)."""
        if self._handle.closed:
            return
        try:
            self._handle.seek(0)
            header_size = _write_header(self._handle, self.num_tokens)
            assert header_size == self._header_size, f"{self.path}: .npy header grew from {self._header_size} bytes"
        finally:
            self._handle.close()

    def __enter__(self) -> "TokenStreamWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_chunks(path: Path, chunk_tokens: int) -> Iterator[np.ndarray]:
    """The tokens of a 1-D .npy stream, chunk_tokens at a time, by plain reads: unlike a memory map, whose pages
    stay resident in the process as it is read, memory stays at one chunk however long the stream."""
    with open(path, "rb") as handle:
        version = npy_format.read_magic(handle)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        if len(shape) != 1:
            raise ValueError(f"{path}: a token stream is 1-D, this array has shape {shape}")
        while (chunk := np.fromfile(handle, dtype=dtype, count=chunk_tokens)).size:
            yield chunk
