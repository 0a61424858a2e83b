"""The byte-level BPE tokenizer of the trained embedded model.

Built with the Hugging Face ``tokenizers`` library and saved as ``tokenizer.json`` plus the
``transformers`` files, so ``PreTrainedTokenizerFast.from_pretrained(folder)`` loads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tide.io import write_text_atomic

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|eos|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
# The trainer gives special tokens the first ids in this order: eos 0, mask 1, pad 2.
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose vocabulary holds all 256 bytes, so any text encodes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    logger.info("trained a byte-level BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> None:
    """Save ``tokenizer`` as a ``transformers`` fast tokenizer with its eos, mask and pad tokens."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        pad_token=PAD_TOKEN,
        # Decoding must return the exact source text; the clean-up would rewrite spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(str(folder))

    # transformers 5 writes its own class name, which transformers 4 does not know; both
    # versions load this one.
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")


def token_byte_lengths(tokenizer: Tokenizer) -> list[int]:
    """Return the number of UTF-8 bytes each token id stands for (0 for special tokens).

    The byte-level pre-tokenizer maps every byte to one printable character, so a token's
    byte count is the length of its string in the vocabulary.
    """
    lengths = [0] * tokenizer.get_vocab_size()
    specials = set(SPECIAL_TOKENS)
    for token, token_id in tokenizer.get_vocab().items():
        lengths[token_id] = 0 if token in specials else len(token)
    return lengths
