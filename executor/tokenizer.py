"""Tokenizers: a byte-level one that needs no download, or a Hugging Face one from the checkpoint.

The byte-level tokenizer maps UTF-8 bytes to ids 0-255 and reserves three ids after them
for end of text, mask and padding. It is saved as ``tokenizer_config.json`` in a
checkpoint folder, so replacing it with a trained tokenizer (a ``tokenizer.json`` that
transformers reads) changes files, not code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol, Sequence

from tide.errors import InputError
from tide.io import read_json, write_text_atomic

logger = logging.getLogger(__name__)

BYTE_TOKENIZER_CLASS = "TideByteTokenizer"
TOKENIZER_CONFIG = "tokenizer_config.json"
NUM_BYTE_TOKENS = 256


class Tokenizer(Protocol):
    eos_token_id: int | None
    mask_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then end of text, mask and padding."""

    def __init__(self, eos_token_id: int = 256, mask_token_id: int = 257, pad_token_id: int = 258) -> None:
        for name, value in (("eos_token_id", eos_token_id), ("mask_token_id", mask_token_id),
                            ("pad_token_id", pad_token_id)):
            if value < NUM_BYTE_TOKENS:
                raise InputError("special ids must follow the 256 byte ids", field=name, value=value,
                                 accepted=">= 256")
        self.eos_token_id = eos_token_id
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode byte ids; special ids are dropped and invalid UTF-8 becomes U+FFFD."""
        data = bytes(i for i in ids if 0 <= i < NUM_BYTE_TOKENS)
        return data.decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        config = {
            "tokenizer_class": BYTE_TOKENIZER_CLASS,
            "num_byte_tokens": NUM_BYTE_TOKENS,
            "eos_token_id": self.eos_token_id,
            "mask_token_id": self.mask_token_id,
            "pad_token_id": self.pad_token_id,
        }
        write_text_atomic(Path(folder) / TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")


class HuggingFaceTokenizer:
    """A transformers tokenizer read from local files, with the interface above."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.eos_token_id = self._tokenizer.eos_token_id
        self.mask_token_id = getattr(self._tokenizer, "mask_token_id", None)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer saved in a checkpoint folder."""
    path = Path(folder)
    config_path = path / TOKENIZER_CONFIG
    config = read_json(config_path, what="tokenizer config") if config_path.is_file() else {}
    if config.get("tokenizer_class") == BYTE_TOKENIZER_CLASS:
        if config.get("num_byte_tokens", NUM_BYTE_TOKENS) != NUM_BYTE_TOKENS:
            raise InputError("unsupported byte vocabulary", source=str(config_path), field="num_byte_tokens",
                             value=config.get("num_byte_tokens"), accepted=str(NUM_BYTE_TOKENS))
        return ByteTokenizer(int(config["eos_token_id"]), int(config["mask_token_id"]),
                             int(config["pad_token_id"]))
    if (path / "tokenizer.json").is_file() or config_path.is_file():
        return HuggingFaceTokenizer(path)
    raise InputError("checkpoint folder has no tokenizer (tokenizer_config.json or tokenizer.json)",
                     source=str(path))
