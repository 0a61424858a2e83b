"""Block diffusion generation with threshold-based parallel decoding and a prefix KV cache.

Positions are grouped into blocks of ``block_length`` from position 0, so the prompt's
last partial block is denoised together with the first generated positions. Attention is
bidirectional inside a block and causal across blocks. A block starts fully masked
(except prompt tokens in it) and takes at most ``steps`` forward passes. Each pass commits
every masked position whose confidence exceeds ``threshold``, and at least the scheduled
number of the most confident ones. The schedule spreads ``block_length`` over the steps,
so a block always finishes within ``steps`` passes.

With the KV cache a pass feeds only the current block: finished blocks never attend to
later ones, so their keys and values stay exact. After a block finishes, one
``cache_write`` pass feeds its final tokens and keeps their keys and values. A prompt of
at least one whole block is fed once by a ``prefill`` pass. Without the cache every pass
feeds the whole sequence up to the end of the current block, and there is no prefill or
cache-write pass.

Generation stops when the first ``gen_tokens`` positions after the prompt are all
committed, or, with ``eos_early_stop``, when an end-of-text token is committed and every
position before it is committed too. The output is cut before the first end-of-text token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import torch

from tide.errors import InputError
from tide.ir import ForwardInfo
from tide.trace import GenerationSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockDiffusionConfig:
    """Settings of one generation run. ``top_k`` 0 and ``top_p`` 1.0 turn those filters off."""

    gen_tokens: int = 128
    block_length: int = 32
    steps: int = 32
    threshold: float = 0.95
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_early_stop: bool = True
    kv_cache: bool = True

    def __post_init__(self) -> None:
        if self.gen_tokens < 1:
            raise InputError("must be at least 1", field="gen_tokens", value=self.gen_tokens)
        if self.block_length < 1:
            raise InputError("must be at least 1", field="block_length", value=self.block_length)
        if not 1 <= self.steps <= self.block_length:
            raise InputError("steps per block must lie between 1 and the block length", field="steps",
                             value=self.steps, accepted=f"1 to {self.block_length}")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError("invalid confidence threshold", field="threshold", value=self.threshold,
                             accepted="a number from 0 to 1")
        if self.temperature < 0.0:
            raise InputError("must not be negative", field="temperature", value=self.temperature)
        if self.top_k < 0:
            raise InputError("must not be negative (0 turns top-k off)", field="top_k", value=self.top_k)
        if not 0.0 < self.top_p <= 1.0:
            raise InputError("invalid nucleus mass", field="top_p", value=self.top_p, accepted="a number in (0, 1]")

    def trace_settings(self) -> GenerationSettings:
        return GenerationSettings(block_length=self.block_length, steps=self.steps, threshold=self.threshold,
                                  temperature=self.temperature, kv_cache=self.kv_cache, gen_tokens=self.gen_tokens)


class ForwardRunner(Protocol):
    """Interface of a model for generation, met by the plain model (``PlainRunner``) and the offload engine."""

    device: torch.device

    def new_kv_cache(self, max_tokens: int): ...

    def forward(self, input_ids: torch.Tensor, *, info: ForwardInfo, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, kv_cache, write_cache: bool) -> torch.Tensor:
        """Run one forward pass on ``input_ids`` [1, T]; return the logits [T, V]."""
        ...

    def end_forward(self, info: ForwardInfo) -> None:
        """Close a forward pass; ``info.committed_tokens`` is now known."""
        ...


@dataclass
class SequenceOutput:
    """One prompt's result: the generated ids (cut before the first end-of-text) and its passes."""

    token_ids: list[int]
    forwards: list[ForwardInfo] = field(default_factory=list)
    num_blocks: int = 0
    stop_reason: str = "length"  # "length" or "eos"

    @property
    def num_denoise_forwards(self) -> int:
        return sum(1 for f in self.forwards if f.kind == "denoise")

    @property
    def committed_tokens(self) -> int:
        return sum(f.committed_tokens for f in self.forwards)


# ----------------------------------------------------------------------------------------
# Pieces


def num_transfer_tokens(block_length: int, steps: int) -> list[int]:
    """Spread ``block_length`` commits over ``steps``: the minimum each step commits."""
    base, remainder = divmod(block_length, steps)
    return [base + (1 if step < remainder else 0) for step in range(steps)]


def block_causal_mask(num_tokens: int, block_length: int, device: torch.device | str) -> torch.Tensor:
    """Return the [T, T] mask for positions 0..T-1: True where the key's block is not after the query's."""
    blocks = torch.arange(num_tokens, device=device) // block_length
    return blocks[None, :] <= blocks[:, None]


def sample_tokens(logits: torch.Tensor, config: BlockDiffusionConfig, mask_token_id: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose a token per row of ``logits`` [T, V]; return the ids [T] and their probabilities [T].

    The mask token is never chosen, because committing it would leave the position masked.
    Temperature 0 is greedy. Otherwise the logits are divided by the temperature, filtered
    to the top-k and to the nucleus of mass top-p, and sampled. The confidence is then the
    sampled token's probability under the filtered distribution.
    """
    logits = logits.float().clone()
    logits[:, mask_token_id] = float("-inf")
    if config.temperature == 0.0:
        probs = torch.softmax(logits, dim=-1)
        confidence, ids = probs.max(dim=-1)
        return ids, confidence
    logits = logits / config.temperature
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p; the best token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return ids, probs.gather(1, ids[:, None]).squeeze(1)


def choose_commits(confidence: torch.Tensor, masked: torch.Tensor, threshold: float, minimum: int) -> torch.Tensor:
    """Choose the masked positions to commit: all above ``threshold``, and at least ``minimum`` best."""
    confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
    above = confidence > threshold
    if int(above.sum()) >= minimum:
        return above
    count = min(minimum, int(masked.sum()))
    chosen = torch.zeros_like(masked)
    chosen[confidence.topk(count).indices] = True
    return chosen


# ----------------------------------------------------------------------------------------
# The generation loop


def generate(runner: ForwardRunner, prompt_ids: Sequence[int], config: BlockDiffusionConfig, *,
             mask_token_id: int, eos_token_id: int | None, sequence: int = 0, first_forward_index: int = 0,
             generator: torch.Generator | None = None,
             on_block: Callable[[SequenceOutput], None] | None = None) -> SequenceOutput:
    """Generate after ``prompt_ids`` by block diffusion; see the module docstring for the rules."""
    if len(prompt_ids) == 0:
        raise InputError("the prompt is empty", field="prompt", value="", accepted="at least one token")
    if mask_token_id in prompt_ids:
        raise InputError("the prompt contains the mask token", field="prompt", value=mask_token_id)
    block_length = config.block_length
    prompt_length = len(prompt_ids)
    target_end = prompt_length + config.gen_tokens
    total_length = math.ceil(target_end / block_length) * block_length
    first_block = prompt_length // block_length
    device = runner.device

    tokens = torch.full((total_length,), mask_token_id, dtype=torch.long)
    tokens[:prompt_length] = torch.tensor(list(prompt_ids), dtype=torch.long)
    kv_cache = runner.new_kv_cache(total_length) if config.kv_cache else None
    output = SequenceOutput(token_ids=[])
    index = first_forward_index

    def run(start: int, end: int, info: ForwardInfo, *, write: bool) -> torch.Tensor:
        input_ids = tokens[start:end].to(device)[None]
        positions = torch.arange(start, end, device=device)[None]
        # A single block at the end of the sequence may attend to every key, so it needs no mask.
        mask = None if end - start <= block_length else block_causal_mask(end, block_length, device)
        return runner.forward(input_ids, info=info, position_ids=positions, attention_mask=mask,
                              kv_cache=kv_cache, write_cache=write)

    if kv_cache is not None and first_block > 0:
        prefill_end = first_block * block_length
        info = ForwardInfo(index, "prefill", sequence, num_tokens=prefill_end, context_tokens=prefill_end)
        run(0, prefill_end, info, write=True)
        runner.end_forward(info)
        output.forwards.append(info)
        index += 1

    schedule = num_transfer_tokens(block_length, config.steps)
    last_block = total_length // block_length - 1
    stop = False
    for absolute_block in range(first_block, last_block + 1):
        block = absolute_block - first_block
        start, end = absolute_block * block_length, (absolute_block + 1) * block_length
        feed_start = start if kv_cache is not None else 0
        for step in range(config.steps):
            masked = tokens[start:end] == mask_token_id
            if not bool(masked.any()):
                break
            info = ForwardInfo(index, "denoise", sequence, block, step, num_tokens=end - feed_start,
                               context_tokens=end)
            logits = run(feed_start, end, info, write=False)
            ids, confidence = sample_tokens(logits[-block_length:], config, mask_token_id, generator)
            commit = choose_commits(confidence.cpu(), masked, config.threshold, schedule[step])
            tokens[start:end] = torch.where(commit, ids.cpu(), tokens[start:end])
            info = replace(info, committed_tokens=int(commit.sum()))
            runner.end_forward(info)
            output.forwards.append(info)
            index += 1
            stop, reason = _should_stop(tokens, prompt_length, target_end, mask_token_id,
                                        eos_token_id if config.eos_early_stop else None)
            if stop:
                output.stop_reason = reason
                break
        output.num_blocks += 1
        if on_block is not None:
            on_block(output)
        if stop or absolute_block == last_block:
            break
        if kv_cache is not None:
            info = ForwardInfo(index, "cache_write", sequence, block, num_tokens=block_length, context_tokens=end)
            run(start, end, info, write=True)
            runner.end_forward(info)
            output.forwards.append(info)
            index += 1

    generated = tokens[prompt_length:target_end].tolist()
    if eos_token_id is not None and eos_token_id in generated:
        generated = generated[:generated.index(eos_token_id)]
        output.stop_reason = "eos"
    if mask_token_id in generated:
        raise RuntimeError("generation ended with masked positions before the end of the output")
    output.token_ids = generated
    return output


def _should_stop(tokens: torch.Tensor, prompt_length: int, target_end: int, mask_token_id: int,
                 eos_token_id: int | None) -> tuple[bool, str]:
    generated = tokens[prompt_length:target_end]
    masked = generated == mask_token_id
    if not bool(masked.any()):
        return True, "length"
    if eos_token_id is not None:
        eos_positions = (generated == eos_token_id).nonzero()
        if len(eos_positions) and not bool(masked[:int(eos_positions[0])].any()):
            return True, "eos"
    return False, ""


# ----------------------------------------------------------------------------------------
# The plain runner: the model's own forward, every expert where the model is


class PlainRunner:
    """Runs the model's all-resident forward pass: the reference the offload engine is measured against."""

    def __init__(self, model, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.eval()
        for block in self.model.moe_blocks():
            block.packed_experts()
        self.num_forwards = 0

    def new_kv_cache(self, max_tokens: int):
        from executor.model import KVCache

        return KVCache(self.model.config, max_tokens, dtype=self.model.get_input_embeddings().weight.dtype,
                       device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, *, info: ForwardInfo, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, kv_cache, write_cache: bool) -> torch.Tensor:
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            kv_cache=kv_cache, write_cache=write_cache).logits
        return logits[0]

    def end_forward(self, info: ForwardInfo) -> None:
        self.num_forwards += 1
