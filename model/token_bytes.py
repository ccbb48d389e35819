"""The bytes a token stands for, read from its piece: what OpenAI's logprobs report as `bytes`, and what
a token that is part of a character (an emoji split over byte tokens) needs, since decoding it alone gives
U+FFFD, whose bytes are not the token's.

The piece is in the vocabulary's own spelling, which the tokenizer's decoder undoes:
- byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen): each byte is written as one printable character (GPT-2's
  byte-to-unicode table: printable Latin-1 bytes as themselves, the rest shifted past U+0100);
- sentencepiece (Llama 2, Mistral): "▁" is a space, and byte fallback writes a byte as "<0xAB>".
Added tokens (special or not) are their text. A decoder of another kind gives None: callers fall back to
decoding the token alone.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable

METASPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_table() -> dict[str, int]:
    """GPT-2's character -> byte table (the inverse of its bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    return [step for d in decoder.get("decoders", [decoder]) for step in _decoder_steps(d)] \
        if decoder.get("type") == "Sequence" else [decoder]


def piece_decoder(backend_json: str) -> Callable[[str], bytes] | None:
    """piece -> bytes for the tokenizer whose tokenizers JSON this is, or None when its decoder is neither
    byte-level nor sentencepiece-like."""
    kinds = {step.get("type") for step in _decoder_steps(json.loads(backend_json).get("decoder"))}
    if "ByteLevel" in kinds:
        table = _byte_level_table()
        return lambda piece: bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
    if kinds & {"ByteFallback", "Metaspace", "Replace"}:
        def sentencepiece(piece: str) -> bytes:
            byte = _BYTE_PIECE.fullmatch(piece)
            return bytes([int(byte.group(1), 16)]) if byte else piece.replace(METASPACE, " ").encode()
        return sentencepiece
    return None


def token_string(raw: bytes, prefix: str = "") -> str:
    """A token's text, or bytes that are not whole UTF-8 characters escaped, "\\xf0\\x9f", as OpenAI's and
    DeepSeek's chat logprobs spell them (OpenAI's legacy completions put prefix "bytes:" before them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return prefix + "".join(f"\\x{b:02x}" for b in raw)
