"""Packing documents into one token stream: each document's tokens followed by the end-of-text token."""

import numpy as np


def pack_stream(flat_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, doc_ids: np.ndarray,
                eot_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream of the given documents (tokens + EOT each): (token ids int32, doc_id int64, position int32)."""
    doc_lengths = lengths[doc_ids]
    sizes = doc_lengths + 1
    starts = np.cumsum(sizes) - sizes
    position = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)
    is_token = position < np.repeat(doc_lengths, sizes)
    source_index = np.repeat(offsets[doc_ids], sizes) + position
    stream = np.full(len(position), eot_id, dtype=np.int32)
    stream[is_token] = flat_ids[source_index[is_token]]
    return stream, np.repeat(doc_ids.astype(np.int64), sizes), position.astype(np.int32)
