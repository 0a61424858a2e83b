"""Train the embedded model's byte-level BPE tokenizer on the training split of the corpus.

Usage: python scripts/train_tokenizer.py [--vocab-size 2048] [--out runs/train-tiny/tokenizer]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from executor.training.corpus import load_corpus
from executor.training.tokenizer import save_tokenizer, token_byte_lengths, train_bpe_tokenizer

logger = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokens in the vocabulary, special tokens included")
    parser.add_argument("--out", type=Path, default=Path("runs/train-tiny/tokenizer"), help="output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    corpus = load_corpus()
    tokenizer = train_bpe_tokenizer((file.text for file in corpus.train), args.vocab_size)
    save_tokenizer(tokenizer, args.out)

    # Compression on the held-out split, which sets how many bytes one predicted token is worth.
    held_out_bytes = sum(file.num_bytes for file in corpus.held_out)
    held_out_tokens = sum(len(tokenizer.encode(file.text).ids) for file in corpus.held_out)
    lengths = token_byte_lengths(tokenizer)
    report = {
        "vocab_size": tokenizer.get_vocab_size(),
        "held_out_bytes": held_out_bytes,
        "held_out_tokens": held_out_tokens,
        "bytes_per_token": held_out_bytes / held_out_tokens,
        "max_token_bytes": max(lengths),
        "corpus": corpus.summary(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
