"""Token streams of the corpus splits and the seeded sampling of training windows.

Every batch is a pure function of (seed, step), so a resumed run reads exactly the batches
an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from executor.training.corpus import CorpusFile

logger = logging.getLogger(__name__)


def encode_files(tokenizer, files: tuple[CorpusFile, ...], eos_token_id: int) -> np.ndarray:
    """Concatenate the token ids of ``files``, each followed by eos, as one uint16 stream."""
    if tokenizer.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {tokenizer.get_vocab_size()} tokens does not fit uint16")
    encodings = tokenizer.encode_batch([file.text for file in files])
    pieces = []
    for encoding in encodings:
        pieces.append(np.asarray(encoding.ids, dtype=np.uint16))
        pieces.append(np.asarray([eos_token_id], dtype=np.uint16))
    return np.concatenate(pieces)


def load_or_encode(cache_path: Path, tokenizer, files: tuple[CorpusFile, ...], eos_token_id: int) -> np.ndarray:
    """Return the token stream of ``files``, cached in ``cache_path`` keyed by tokenizer and file list."""
    key = hashlib.sha256(tokenizer.to_str().encode("utf-8"))
    for file in files:
        key.update(file.relative_path.encode("utf-8"))
        key.update(str(file.num_bytes).encode("ascii"))
    stamped = cache_path.with_name(f"{cache_path.stem}-{key.hexdigest()[:16]}.npy")
    if stamped.is_file():
        return np.load(stamped)
    stream = encode_files(tokenizer, files, eos_token_id)
    stamped.parent.mkdir(parents=True, exist_ok=True)
    temporary = stamped.with_suffix(".tmp.npy")
    np.save(temporary, stream)
    temporary.replace(stamped)
    logger.info("encoded %d files into %d tokens (%s)", len(files), stream.size, stamped)
    return stream


def sample_windows(stream: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """Return ``batch_size`` windows of ``seq_len`` tokens at offsets drawn from (seed, step).

    Shape [batch_size, seq_len], dtype int64.
    """
    if stream.size <= seq_len:
        raise ValueError(f"token stream of {stream.size} tokens is shorter than seq_len {seq_len}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.size - seq_len, size=batch_size)
    windows = np.stack([stream[start:start + seq_len] for start in starts]).astype(np.int64)
    return torch.from_numpy(windows)


def held_out_windows(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Split the held-out stream into consecutive non-overlapping windows, dropping the tail.

    Shape [num_windows, seq_len], dtype int64.
    """
    num_windows = stream.size // seq_len
    return torch.from_numpy(stream[:num_windows * seq_len].astype(np.int64).reshape(num_windows, seq_len))
