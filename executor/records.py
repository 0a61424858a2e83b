"""Records of a run: the trace (routing of every pass), the measured timeline and a summary."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from executor.generate import BlockDiffusionConfig, SequenceOutput
from tide.ir import Timeline
from tide.trace import Trace, TraceMetadata


def build_trace(engine, spec, config: BlockDiffusionConfig, prompt_ids: Sequence[str],
                extra: Mapping[str, Any] | None = None) -> Trace:
    """Return the trace of every forward pass the engine ran (its ``record_trace`` must be on)."""
    if not engine.record_trace:
        raise ValueError("the engine did not record routing (record_trace=False)")
    metadata = TraceMetadata(
        spec_name=spec.name, spec_hash=spec.config_hash, num_moe_layers=spec.num_moe_layers,
        num_experts=spec.num_experts, top_k=spec.top_k, prompt_ids=tuple(prompt_ids),
        generation=config.trace_settings(), source="executor", extra=dict(extra or {}))
    layers, top_k = spec.num_moe_layers, spec.top_k
    experts = np.concatenate(engine.routing) if engine.routing else np.zeros((0, layers, top_k), np.int16)
    weights = (np.concatenate(engine.routing_weights).astype(np.float32) if engine.routing_weights
               else np.zeros((0, layers, top_k), np.float32))
    return Trace(metadata, tuple(engine.forwards), experts, weights)


def build_timeline(engine, metadata: Mapping[str, Any] | None = None) -> Timeline:
    """Return the measured timeline: one span per op, seconds from the engine's start."""
    return Timeline(source="measured", spans=tuple(engine.spans), forwards=tuple(engine.forwards),
                    metadata=dict(metadata or {}))


def summarize(engine, outputs: Sequence[SequenceOutput], elapsed_s: float) -> dict[str, Any]:
    """Summarise a run: tokens and rates, hits and misses, bytes copied and time on each lane.

    ``tokens`` counts the returned tokens (cut before end of text); ``tokens_per_forward``
    is the committed tokens per denoising pass, the parallelism of the decoding.
    """
    counters = engine.counters
    tokens = sum(len(o.token_ids) for o in outputs)
    committed = sum(o.committed_tokens for o in outputs)
    denoise = sum(o.num_denoise_forwards for o in outputs)
    budgets = list(engine.plan.slot_budgets)
    return {
        "policy": engine.plan.policy,
        "intervals": sorted(set(engine.plan.intervals)),
        "slots": budgets[0] if len(set(budgets)) == 1 else budgets,
        "device": str(engine.device),
        "pinned": engine.pinned,
        "pinning": engine.pinning_note,
        "num_prompts": len(outputs),
        "tokens": tokens,
        "committed_tokens": committed,
        "num_forwards": counters.num_forwards,
        "num_denoise_forwards": denoise,
        "elapsed_s": elapsed_s,
        "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "tokens_per_forward": committed / denoise if denoise else 0.0,
        "hits": counters.hits,
        "misses": counters.misses,
        "hit_rate": counters.hit_rate,
        "expert_copies": counters.expert_copies,
        "h2d_bytes": counters.h2d_bytes,
        "d2h_bytes": counters.d2h_bytes,
        "load_h2d_bytes": engine.load_h2d_bytes,
        "lane_busy_s": engine.lane_busy_s(),
    }
