"""The training corpus: the Python standard library's source files of the running interpreter.

Files are split into training and held-out sets by a hash of their path relative to the
standard library folder, so the split is the same on every machine with the same Python
version and never mixes the two sets.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# One file in HELD_OUT_BUCKETS hash buckets goes to the held-out set (2% of files).
NUM_HASH_BUCKETS = 50
HELD_OUT_BUCKETS = frozenset({0})


@dataclass(frozen=True)
class CorpusFile:
    relative_path: str
    text: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class Corpus:
    """The standard library's ``*.py`` files, split into training and held-out sets."""

    root: str
    python_version: str
    train: tuple[CorpusFile, ...]
    held_out: tuple[CorpusFile, ...]
    num_skipped: int

    def file_list_sha256(self) -> str:
        """Return the SHA-256 of both splits' relative paths, which identifies exactly which files were used."""
        digest = hashlib.sha256()
        for split, files in (("train", self.train), ("held_out", self.held_out)):
            for file in files:
                digest.update(f"{split}\t{file.relative_path}\n".encode("utf-8"))
        return digest.hexdigest()

    def summary(self) -> dict:
        return {
            "root": self.root,
            "python_version": self.python_version,
            "num_train_files": len(self.train),
            "num_held_out_files": len(self.held_out),
            "train_bytes": sum(f.num_bytes for f in self.train),
            "held_out_bytes": sum(f.num_bytes for f in self.held_out),
            "num_skipped_files": self.num_skipped,
            "file_list_sha256": self.file_list_sha256(),
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str) -> bool:
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:4], "big") % NUM_HASH_BUCKETS
    return bucket in HELD_OUT_BUCKETS


def load_corpus(root: str | Path | None = None) -> Corpus:
    """Read every ``*.py`` file under ``root`` (default: the standard library), outside site-packages.

    Files that are not valid UTF-8 are skipped and counted, because the tokenizer and the
    bits-per-byte figures are defined on UTF-8 text.
    """
    root_path = Path(root) if root is not None else stdlib_root()
    train: list[CorpusFile] = []
    held_out: list[CorpusFile] = []
    num_skipped = 0
    for path in sorted(root_path.rglob("*.py")):
        relative = path.relative_to(root_path).as_posix()
        if "site-packages" in path.relative_to(root_path).parts or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            num_skipped += 1
            continue
        if not text.strip():
            continue
        file = CorpusFile(relative, text)
        (held_out if is_held_out(relative) else train).append(file)
    version = ".".join(str(part) for part in sys.version_info[:3])
    corpus = Corpus(str(root_path), version, tuple(train), tuple(held_out), num_skipped)
    logger.info("corpus %s: %d training files, %d held-out files, %d skipped (not UTF-8)",
                root_path, len(train), len(held_out), num_skipped)
    return corpus
