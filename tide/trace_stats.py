"""Statistics of a trace: tokens per forward pass, distinct experts, step-to-step stability, hit rates.

These are the figures ``tide trace info`` prints and the planner and notebooks read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tide.ir import ForwardInfo
from tide.policies import Interval, LayerState, PolicyState
from tide.trace import Trace


@dataclass(frozen=True)
class TraceStats:
    num_forwards: int
    forwards_by_kind: dict[str, int]
    generated_tokens: int  # committed tokens of all passes
    returned_tokens: int  # tokens the run returned (tide.trace.Trace.output_tokens)
    tokens_per_forward: float  # committed tokens per denoising pass
    distinct_experts_per_forward: float  # mean over denoising passes and MoE layers
    distinct_experts_per_layer: list[float]  # mean over denoising passes, per MoE layer
    adjacent_step_overlap: float  # |A_t ∩ A_t-1| / |A_t| of activated expert sets, mean
    adjacent_step_cosine: float  # cosine similarity of tokens-per-expert vectors, mean

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def expert_counts(trace: Trace, index: int) -> np.ndarray:
    """Return tokens per expert for every MoE layer of one forward pass, as [L, E]."""
    routing = trace.routing(index)  # [T, L, K]
    num_layers, num_experts = trace.metadata.num_moe_layers, trace.metadata.num_experts
    offsets = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]
    flat = (routing.astype(np.int64) + offsets).ravel()
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def adjacent_denoise_pairs(forwards: tuple[ForwardInfo, ...]) -> list[tuple[int, int]]:
    """Pairs of consecutive denoising steps of the same block and sequence."""
    pairs = []
    previous: ForwardInfo | None = None
    for forward in forwards:
        if forward.kind != "denoise":
            continue
        if previous is not None and (previous.sequence, previous.block) == (forward.sequence, forward.block):
            pairs.append((previous.index, forward.index))
        previous = forward
    return pairs


def compute_stats(trace: Trace) -> TraceStats:
    forwards = trace.forwards
    by_kind: dict[str, int] = {}
    for forward in forwards:
        by_kind[forward.kind] = by_kind.get(forward.kind, 0) + 1
    denoise = [f.index for f in forwards if f.kind == "denoise"]
    generated = sum(f.committed_tokens for f in forwards)
    counts = {i: expert_counts(trace, i) for i in denoise}
    distinct = np.array([(counts[i] > 0).sum(axis=1) for i in denoise], dtype=float)  # [F, L]
    overlaps, cosines = [], []
    for before, after in adjacent_denoise_pairs(forwards):
        a, b = counts[before] > 0, counts[after] > 0
        overlaps.append(((a & b).sum(axis=1) / np.maximum(b.sum(axis=1), 1)).mean())
        x, y = counts[before].astype(float), counts[after].astype(float)
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        cosines.append(((x * y).sum(axis=1) / np.maximum(norms, 1e-12)).mean())
    return TraceStats(
        num_forwards=len(forwards),
        forwards_by_kind=by_kind,
        generated_tokens=int(generated),
        returned_tokens=int(trace.output_tokens()),
        tokens_per_forward=generated / len(denoise) if denoise else 0.0,
        distinct_experts_per_forward=float(distinct.mean()) if distinct.size else 0.0,
        distinct_experts_per_layer=distinct.mean(axis=0).round(3).tolist() if distinct.size else [],
        adjacent_step_overlap=float(np.mean(overlaps)) if overlaps else float("nan"),
        adjacent_step_cosine=float(np.mean(cosines)) if cosines else float("nan"),
    )


def interval_hit_rate(trace: Trace, slot_budget: int, interval: int, first_block_rule: str = "every-step") -> float:
    """Return the hit rate of the tide policy with ``slot_budget`` slots per layer and interval τ.

    It replays the policy's placement decisions only (no costs), counting an assignment as
    a hit when its expert was resident before the pass changed anything.
    """
    from tide.ir import Overlap, Plan

    num_layers = trace.metadata.num_moe_layers
    plan = Plan(policy="tide", slot_budgets=(slot_budget,) * num_layers, intervals=(interval,) * num_layers,
                miss_service=("cpu",) * num_layers, first_block_rule=first_block_rule, overlap=Overlap())
    policy = Interval()
    state = PolicyState(layers=[LayerState.with_residents(slot_budget, []) for _ in range(num_layers)])
    hits = total = 0
    for forward in trace.forwards:
        counts = expert_counts(trace, forward.index)
        for layer in range(num_layers):
            placement = policy.place(plan, state, forward, layer, counts[layer])
            hits += sum(n for _, n in placement.hits)
            total += int(counts[layer].sum())
    return hits / total if total else 0.0
