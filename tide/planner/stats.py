"""Routing statistics for the planner: what each (slot budget, τ) pair gives one MoE layer.

Shape letters: F forward passes, L MoE layers, E experts, B slot budgets in the grid.

``LayerPricer`` replays the ``tide`` policy's placement logic (``tide.policies``:
``is_refresh_pass``, the top-B refresh target and ``refresh_to``'s demotion order) for
one MoE layer, for every slot budget of a grid at once, with numpy; ``replay_layer`` does
so for one τ. Between two refreshes a layer's resident set does not change, so the
passes between refreshes are priced together with one matrix product per resident set.
The refreshes that every τ shares (the prompt and the first generated block, under the
``every-step`` rule) are replayed once per layer.

The time of one MoE layer in one pass follows the op order of ``tide.lowering`` with
copies overlapping compute and CPU work overlapping GPU work, relative to the end of the
router (``head_s`` after the layer starts):

* GPU lane: the shared expert, the resident experts' ``gpu_experts``, then each promoted
  expert's ``gpu_expert`` once its copy has landed. Copy i (1-based, in refresh order)
  lands at i x copy time, so the lane ends at
  max(shared + hits + sum(g), max_i(i x copy + sum_{j >= i} g_j));
* CPU path: ``act_d2h``, ``cpu_experts``, then ``act_h2d``, which queues behind the
  copies on the host-to-device lane;
* ``combine`` waits for both.

Layers run one after another and drain every lane before the next starts, because every
copy of the ``tide`` policy has a reader that ``combine`` waits for. A pass therefore
takes its plan-independent time plus the sum of its MoE layers' times, and the planner's
program adds the layers up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from tide.ir import Plan
from tide.planner.pricing import PassCosts, Pricing
from tide.policies import is_refresh_pass
from tide.trace import Trace

logger = logging.getLogger(__name__)


def routing_counts(trace: Trace) -> np.ndarray:
    """Count the tokens routed to each expert in every pass and MoE layer, as int32 [F, L, E]."""
    num_layers = trace.metadata.num_moe_layers
    num_experts = trace.metadata.num_experts
    num_forwards = trace.num_forwards
    tokens_per_forward = np.diff(trace.offsets)
    forward_of_row = np.repeat(np.arange(num_forwards, dtype=np.int64), tokens_per_forward)
    cells = (forward_of_row[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) * num_experts
    flat = (cells + trace.experts.astype(np.int64)).ravel()
    counts = np.bincount(flat, minlength=num_forwards * num_layers * num_experts)
    return counts.reshape(num_forwards, num_layers, num_experts).astype(np.int32)


def refresh_flags(forwards, interval: int, first_block_rule: str = "every-step") -> np.ndarray:
    """Mark the passes in which the ``tide`` policy refreshes a layer with this τ, as bool [F]."""
    plan = Plan(policy="tide", slot_budgets=(1,), intervals=(interval,), miss_service=("cpu",),
                first_block_rule=first_block_rule)
    return np.array([is_refresh_pass(plan, forward, 0) for forward in forwards], dtype=bool)


def candidate_intervals(forwards, first_block_rule: str = "every-step",
                        max_interval: int = 32) -> list[int]:
    """Return the τ values worth pricing: 1 up to the longest block, one per distinct refresh pattern.

    Two τ values with the same refresh passes give the same schedule on this trace, so
    only the smallest of them is kept.
    """
    steps = [f.step for f in forwards if f.kind == "denoise"]
    longest = max(steps, default=0) + 1
    intervals = []
    seen = set()
    for interval in range(1, min(longest, max_interval) + 1):
        pattern = refresh_flags(forwards, interval, first_block_rule).tobytes()
        if pattern not in seen:
            seen.add(pattern)
            intervals.append(interval)
    return intervals


def refresh_all(resident: np.ndarray, tokens: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Apply one refresh to the resident sets of every budget, as ``tide.policies`` does.

    ``resident`` is bool [B, E], one resident set per budget; ``tokens`` is the pass's
    tokens per expert [E]. The target is the top-budget active experts by tokens, ties to
    the lower id. Experts outside the target are demoted, fewest tokens (then lowest id)
    first, and only as many as the promotions need beyond the empty slots. Returns the
    new resident sets.
    """
    return _refresh(resident, _PassOrder.of(tokens), budgets)


@dataclass(frozen=True)
class _PassOrder:
    """The orders one pass's tokens impose on a layer's experts, whatever the budget and τ."""

    ranked: np.ndarray  # [A] active experts, most tokens first, ties to the lower id
    rank_of: np.ndarray  # [E] position in ``ranked``, E + 1 for inactive experts
    demotion: np.ndarray  # [E] every expert, fewest tokens first, then the lowest id

    @classmethod
    def of(cls, tokens: np.ndarray) -> "_PassOrder":
        num_experts = tokens.shape[0]
        ids = np.arange(num_experts)
        ranked = np.lexsort((ids, -tokens.astype(np.int64)))
        ranked = ranked[tokens[ranked] > 0]
        rank_of = np.full(num_experts, num_experts + 1)
        rank_of[ranked] = np.arange(ranked.size)
        return cls(ranked, rank_of, np.lexsort((ids, tokens)))


def _refresh(resident: np.ndarray, order: _PassOrder, budgets: np.ndarray) -> np.ndarray:
    target = order.rank_of[None, :] < budgets[:, None]  # [B, E]
    num_promote = (target & ~resident).sum(axis=1)
    empty = budgets - resident.sum(axis=1)
    num_demote = np.maximum(num_promote - empty, 0)
    after = resident | target
    if num_demote.any():
        demotable = (resident & ~target)[:, order.demotion]
        demote = demotable & (np.cumsum(demotable, axis=1) <= num_demote[:, None])
        after[:, order.demotion] &= ~demote
    return after


@dataclass(frozen=True)
class LayerReplay:
    """One MoE layer under the ``tide`` policy with one τ, for each budget of a grid."""

    budgets: np.ndarray  # [B]
    interval: int
    time_s: np.ndarray  # [F, B] the layer's time in each pass
    hit_tokens: np.ndarray  # [B] assignments served by experts resident before the pass
    cpu_tokens: np.ndarray  # [B] assignments served on the CPU
    expert_copies: np.ndarray  # [B]


@dataclass
class _ReplayState:
    """A replay part-way through a trace: resident sets and what the passes so far cost."""

    resident: np.ndarray  # bool [B, E]
    time_s: np.ndarray  # [F, B]
    hit_tokens: np.ndarray  # [B]
    cpu_tokens: np.ndarray  # [B]
    expert_copies: np.ndarray  # [B]

    @classmethod
    def empty(cls, num_forwards: int, num_budgets: int, num_experts: int) -> "_ReplayState":
        return cls(np.zeros((num_budgets, num_experts), dtype=bool), np.zeros((num_forwards, num_budgets)),
                   np.zeros(num_budgets, dtype=np.int64), np.zeros(num_budgets, dtype=np.int64),
                   np.zeros(num_budgets, dtype=np.int64))

    def copy(self) -> "_ReplayState":
        return _ReplayState(self.resident.copy(), self.time_s.copy(), self.hit_tokens.copy(),
                            self.cpu_tokens.copy(), self.expert_copies.copy())


class LayerPricer:
    """Vectorised replay and layer times for one layer's routing, shared by every τ of that layer.

    Per pass it keeps the experts in refresh order with their tokens and prices, so a
    refresh pass only touches its active experts.
    """

    def __init__(self, counts: np.ndarray, pricing: Pricing, passes: PassCosts, budgets: np.ndarray) -> None:
        self.counts = counts  # [F, E]
        self.budgets = np.asarray(budgets, dtype=np.int64)
        self.pricing = pricing
        self.passes = passes
        active = counts > 0
        self.active = active
        self.gpu_marginal = np.where(active, pricing.gpu_marginal_s(counts), 0.0)
        self.cpu_marginal = np.where(active, pricing.cpu_marginal_s(counts), 0.0)
        self.cpu_marginal_total = self.cpu_marginal.sum(axis=1)
        self.assignments = counts.sum(axis=1).astype(np.int64)
        self.num_active = active.sum(axis=1)
        self.orders = [_PassOrder.of(row) for row in counts]
        self.ranked_tokens = [counts[f, order.ranked].astype(np.int64) for f, order in enumerate(self.orders)]
        self.ranked_run_s = [pricing.gpu_expert_s(tokens) for tokens in self.ranked_tokens]
        # Dense tables of the activation copies, indexed by rows and by CPU assignments.
        self.act_d2h_s = pricing.act_d2h_s(np.arange(int(passes.num_tokens.max(initial=0)) + 1))
        self.act_h2d_s = pricing.act_h2d_s(np.arange(int(self.assignments.max(initial=0)) + 1))

    def _finish(self, passes: np.ndarray, gpu_s: np.ndarray, num_cpu: np.ndarray, cpu_s: np.ndarray,
                cpu_tokens: np.ndarray, num_copies: np.ndarray) -> np.ndarray:
        """Combine the lanes of some passes ([B, m] each) into layer times [B, m].

        ``gpu_s`` is when the GPU lane ends its expert work, counted from the router's end.
        """
        pricing = self.pricing
        costs = self.passes
        rows = np.minimum(costs.num_tokens[passes][None, :], cpu_tokens)
        cpu_work = np.where(num_cpu > 0, pricing.cpu_experts_fixed_s + cpu_s, 0.0)
        ready = np.maximum(self.act_d2h_s[rows] + cpu_work, num_copies * pricing.expert_copy_s)
        cpu = np.where(num_cpu > 0, ready + self.act_h2d_s[cpu_tokens], 0.0)
        return costs.head_s[passes] + np.maximum(gpu_s, cpu) + costs.combine_s[passes]

    def steady(self, state: _ReplayState, passes: np.ndarray) -> None:
        """Price passes without a refresh, in which the resident set serves as it is."""
        weights = state.resident.astype(np.float64)
        hit_s = weights @ self.gpu_marginal[passes].T  # [B, m]
        num_hits = np.rint(weights @ self.active[passes].T.astype(np.float64)).astype(np.int64)
        hit_tokens = np.rint(weights @ self.counts[passes].T.astype(np.float64)).astype(np.int64)
        cpu_s = self.cpu_marginal_total[passes][None, :] - weights @ self.cpu_marginal[passes].T
        num_cpu = self.num_active[passes][None, :] - num_hits
        cpu_tokens = self.assignments[passes][None, :] - hit_tokens
        gpu_s = self.passes.shared_s[passes] + np.where(num_hits > 0, self.pricing.gpu_experts_fixed_s + hit_s, 0.0)
        time = self._finish(passes, gpu_s, num_cpu, cpu_s, cpu_tokens, np.zeros_like(num_hits))
        state.time_s[passes] = time.T
        state.hit_tokens += hit_tokens.sum(axis=1)
        state.cpu_tokens += cpu_tokens.sum(axis=1)

    def refresh(self, state: _ReplayState, index: int) -> None:
        """Refresh the resident sets in pass ``index`` and price the pass."""
        pricing = self.pricing
        order = self.orders[index]
        before = state.resident
        after = _refresh(before, order, self.budgets)
        columns = order.ranked  # only active experts are hit, missed or promoted
        before_active = before[:, columns]
        after_active = after[:, columns]
        hit = before_active & after_active  # [B, A]
        cpu = ~after_active
        # Every promoted expert is active, so each gets a gpu_expert op, in refresh order.
        promoted = after_active & ~before_active
        tokens = self.ranked_tokens[index]
        num_hits = hit.sum(axis=1)
        num_cpu = cpu.sum(axis=1)
        hit_s = hit @ self.gpu_marginal[index, columns]
        cpu_s = cpu @ self.cpu_marginal[index, columns]
        cpu_tokens = cpu @ tokens
        num_copies = promoted.sum(axis=1)

        run_s = np.where(promoted, self.ranked_run_s[index][None, :], 0.0)
        hits = np.where(num_hits > 0, pricing.gpu_experts_fixed_s + hit_s, 0.0)
        gpu_s = self.passes.shared_s[index] + hits + run_s.sum(axis=1)
        if num_copies.any():
            # Copy i lands at i x copy time; the lane ends after the last run that waited for one.
            position = np.cumsum(promoted, axis=1)
            remaining_s = np.cumsum(run_s[:, ::-1], axis=1)[:, ::-1]
            chain = np.where(promoted, position * pricing.expert_copy_s + remaining_s, 0.0).max(axis=1)
            gpu_s = np.maximum(gpu_s, chain)

        passes = np.array([index])
        time = self._finish(passes, gpu_s[:, None], num_cpu[:, None], cpu_s[:, None], cpu_tokens[:, None],
                            num_copies[:, None])
        state.time_s[index] = time[:, 0]
        state.hit_tokens += hit @ tokens
        state.cpu_tokens += cpu_tokens
        state.expert_copies += num_copies
        state.resident = after

    def replay(self, state: _ReplayState, flags: np.ndarray, start: int, stop: int) -> None:
        """Advance ``state`` over passes [start, stop) with refresh flags ``flags``."""
        waiting: list[int] = []
        for index in range(start, stop):
            if not flags[index]:
                waiting.append(index)
                continue
            if waiting:
                self.steady(state, np.array(waiting))
                waiting.clear()
            self.refresh(state, index)
        if waiting:
            self.steady(state, np.array(waiting))

    def replay_intervals(self, flags_by_interval: list[np.ndarray]) -> list[_ReplayState]:
        """Replay every τ, sharing the passes at the start of the trace where all τ refresh alike."""
        num_forwards = self.counts.shape[0]
        shared = num_forwards
        for flags in flags_by_interval[1:]:
            differ = np.flatnonzero(flags != flags_by_interval[0])
            if differ.size:
                shared = min(shared, int(differ[0]))
        common = _ReplayState.empty(num_forwards, self.budgets.size, self.counts.shape[1])
        self.replay(common, flags_by_interval[0], 0, shared)
        states = []
        for flags in flags_by_interval:
            state = common.copy()
            self.replay(state, flags, shared, num_forwards)
            states.append(state)
        return states


def replay_layer(counts: np.ndarray, flags: np.ndarray, budgets: np.ndarray, pricing: Pricing,
                 passes: PassCosts, interval: int = 0, pricer: LayerPricer | None = None) -> LayerReplay:
    """Replay the ``tide`` policy on one MoE layer for every budget in ``budgets``.

    ``counts`` is the layer's tokens per expert [F, E] and ``flags`` the refresh passes
    [F] of one τ (``refresh_flags``). ``interval`` only labels the result.
    """
    budgets = np.asarray(budgets, dtype=np.int64)
    pricer = pricer or LayerPricer(counts, pricing, passes, budgets)
    state = _ReplayState.empty(counts.shape[0], budgets.size, counts.shape[1])
    pricer.replay(state, flags, 0, counts.shape[0])
    return LayerReplay(budgets, interval, state.time_s, state.hit_tokens, state.cpu_tokens, state.expert_copies)
