"""The masked-diffusion objective of LLaDA and its held-out evaluation in bits per byte.

Shape letters: B sequences, L tokens per sequence, V vocabulary, H hidden size.

Training follows LLaDA. Each sequence draws a mask ratio t in (eps, 1], and every token is
replaced by the mask token with probability t. The loss is the cross-entropy on the masked
positions, either weighted by 1/t as in LLaDA (an upper bound on the negative
log-likelihood) or averaged over the masked positions (see ``diffusion_loss``).

Attention is block-causal as in LLaDA2's block diffusion: bidirectional inside a block of
``block_length`` tokens and causal across blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def block_causal_mask(seq_len: int, block_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return the [L, L] boolean mask where query i may attend key j (True) iff block(j) <= block(i)."""
    if block_length < 1:
        raise ValueError(f"block_length must be at least 1, got {block_length}")
    block = torch.arange(seq_len, device=device) // block_length
    return block[None, :] <= block[:, None]


def sample_mask_ratios(batch_size: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """Draw one mask ratio per sequence in (eps, 1], stratified over the batch.

    Stratifying (one draw in each of B equal sub-intervals, shared random offset) keeps the
    uniform marginal of LLaDA's t but spreads each batch over the whole range of t.
    Shape [B].
    """
    offset = torch.rand((), generator=generator)
    strata = (torch.arange(batch_size, dtype=torch.float32) + offset) / batch_size
    order = torch.randperm(batch_size, generator=generator)
    return eps + (1.0 - eps) * strata[order]


def mask_tokens(input_ids: torch.Tensor, ratios: torch.Tensor, mask_token_id: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token by ``mask_token_id`` with its row's probability; return (noisy ids, mask).

    ``input_ids`` [B, L], ``ratios`` [B]; both outputs are [B, L].
    """
    draws = torch.rand(input_ids.shape, generator=generator)
    masked = draws < ratios[:, None]
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked


def mask_fixed_fraction(input_ids: torch.Tensor, fraction: float, mask_token_id: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask exactly round(fraction * L) positions of each row, chosen uniformly; return (noisy ids, mask)."""
    batch_size, seq_len = input_ids.shape
    num_masked = max(1, round(fraction * seq_len))
    scores = torch.rand((batch_size, seq_len), generator=generator)
    chosen = scores.argsort(dim=1)[:, :num_masked]
    masked = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    masked.scatter_(1, chosen, True)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked


def masked_logits(model, noisy_ids: torch.Tensor, masked: torch.Tensor, block_length: int) -> torch.Tensor:
    """Run ``model`` with block-causal attention and return logits at the masked positions only.

    Applying the output head only where the loss needs it saves about half its cost. Shape [N, V]
    for N masked positions.
    """
    seq_len = noisy_ids.shape[1]
    attention_mask = block_causal_mask(seq_len, block_length, noisy_ids.device)[None, None]
    hidden = model.model(input_ids=noisy_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
    return model.lm_head(hidden[masked])


LOSS_WEIGHTINGS = ("elbo", "token_mean")


def diffusion_loss(model, input_ids: torch.Tensor, mask_token_id: int, block_length: int,
                   generator: torch.Generator, eps: float = 1e-3,
                   weighting: str = "elbo") -> tuple[torch.Tensor, dict]:
    """Return the masked-diffusion training loss of one batch and statistics for the log.

    ``weighting`` "elbo" is LLaDA's loss: cross-entropy on masked positions weighted by 1/t,
    summed and divided by B * L. "token_mean" is the plain mean cross-entropy over the
    batch's masked positions. Both are minimised by the same denoiser (the true
    distribution of each masked token given the noisy sequence). They differ in emphasis:
    "elbo" gives each sequence about the same weight, scaling up the few masked tokens of a
    low-t sequence by 1/t, while "token_mean" gives each masked token the same weight and
    never multiplies a token's loss.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")
    ratios = sample_mask_ratios(input_ids.shape[0], eps, generator)
    noisy, masked = mask_tokens(input_ids, ratios, mask_token_id, generator)
    logits = masked_logits(model, noisy, masked, block_length)
    cross_entropy = F.cross_entropy(logits.float(), input_ids[masked], reduction="none")  # [N]
    if weighting == "elbo":
        row_of_masked = masked.nonzero()[:, 0]
        loss = (cross_entropy / ratios[row_of_masked]).sum() / input_ids.numel()
    else:
        loss = cross_entropy.sum() / max(1, cross_entropy.numel())
    stats = {
        "masked_tokens": int(masked.sum()),
        # Unweighted cross-entropy per masked token, in nats: comparable across steps and weightings.
        "masked_ce": float(cross_entropy.mean().detach()) if cross_entropy.numel() else float("nan"),
    }
    return loss, stats


@dataclass(frozen=True)
class BitsPerByte:
    total_bits: float
    total_bytes: int
    num_masked_tokens: int

    @property
    def bits_per_byte(self) -> float:
        return self.total_bits / self.total_bytes

    @property
    def bits_per_token(self) -> float:
        return self.total_bits / self.num_masked_tokens


def bits_per_byte(log_probs: torch.Tensor, targets: torch.Tensor, token_byte_lengths: torch.Tensor) -> BitsPerByte:
    """Sum the information content of ``targets`` under ``log_probs`` (natural log) per byte of text.

    ``log_probs`` [N, V], ``targets`` [N], ``token_byte_lengths`` [V]: bytes of text each token
    id stands for. Bits per byte = sum(-log2 p(target)) / sum(bytes of target).
    """
    nats = -log_probs.gather(1, targets[:, None]).squeeze(1).double()
    total_bits = float(nats.sum()) / math.log(2)
    total_bytes = int(token_byte_lengths[targets].sum())
    return BitsPerByte(total_bits, total_bytes, int(targets.numel()))


@torch.no_grad()
def evaluate_bits_per_byte(model, windows: torch.Tensor, token_byte_lengths: torch.Tensor, mask_token_id: int,
                           block_length: int, fraction: float = 0.15, seed: int = 0,
                           batch_size: int = 16) -> BitsPerByte:
    """Held-out bits per byte with ``fraction`` of each window's tokens masked (fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    total_bits = 0.0
    total_bytes = 0
    num_masked = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            noisy, masked = mask_fixed_fraction(batch, fraction, mask_token_id, generator)
            logits = masked_logits(model, noisy, masked, block_length)
            result = bits_per_byte(torch.log_softmax(logits.float(), dim=-1), batch[masked], token_byte_lengths)
            total_bits += result.total_bits
            total_bytes += result.total_bytes
            num_masked += result.num_masked_tokens
    finally:
        model.train(was_training)
    return BitsPerByte(total_bits, total_bytes, num_masked)


def unigram_bits_per_byte(train_bytes: bytes, held_out_bytes: bytes) -> float:
    """Cross-entropy of ``held_out_bytes`` under the byte frequencies of ``train_bytes`` (add-one smoothed)."""
    train_counts = torch.bincount(torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long(), minlength=256)
    probabilities = (train_counts.double() + 1.0) / (train_counts.sum() + 256)
    held_out_counts = torch.bincount(torch.frombuffer(bytearray(held_out_bytes), dtype=torch.uint8).long(),
                                     minlength=256)
    total_bits = -(held_out_counts.double() * probabilities.log2()).sum()
    return float(total_bits / len(held_out_bytes))


def unigram_token_bits_per_byte(train_stream: torch.Tensor, held_out_stream: torch.Tensor,
                                token_byte_lengths: torch.Tensor) -> float:
    """Cross-entropy of held-out tokens under training token frequencies (add-one), per byte of text."""
    vocab_size = token_byte_lengths.numel()
    train_counts = torch.bincount(train_stream, minlength=vocab_size).double()
    log_probs = ((train_counts + 1.0) / (train_counts.sum() + vocab_size)).log()
    result = bits_per_byte(log_probs[None].expand(held_out_stream.numel(), -1), held_out_stream, token_byte_lengths)
    return result.bits_per_byte
