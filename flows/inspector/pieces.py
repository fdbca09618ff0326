"""Token ids -> the text each token draws in the inspector: byte-level BPE pieces decoded exactly.

A byte-level token stands for bytes (GPT-2's byte-to-unicode alphabet in its vocabulary string); a character
whose UTF-8 bytes are split over two tokens belongs to the token that completes it, the earlier one draws
nothing (and says so on hover). Concatenated, the pieces are exactly the decoded text, whitespace and newlines
included. Tokenizers that are not byte-level fall back to decoding each id alone.
"""

import codecs
import json
from functools import lru_cache

from tokenizers import Tokenizer


def byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte value -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenPieces:
    """Decodes token ids into per-token text pieces with one tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        self.special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.alphabet = byte_alphabet()
        self.piece_bytes = lru_cache(maxsize=1 << 16)(self._piece_bytes)

    def _piece_bytes(self, token_id: int) -> bytes:
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            return f"<unknown id {token_id}>".encode()
        if self.byte_level and token_id not in self.special and all(c in self.alphabet for c in token):
            return bytes(self.alphabet[c] for c in token)
        return (token if token_id in self.special else self.tokenizer.decode([token_id])).encode()

    def texts(self, ids: list[int]) -> list[str]:
        """The text each token draws; ''.join(result) is the decoded text (bad UTF-8 shows as U+FFFD)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pieces = [decoder.decode(self.piece_bytes(int(i))) for i in ids]
        if pieces:
            pieces[-1] += decoder.decode(b"", final=True)
        return pieces

    def is_special(self, token_id: int) -> bool:
        """True for an added special token (e.g. <|endoftext|>)."""
        return int(token_id) in self.special
