"""Expert placement policies: which experts sit in each MoE layer's slots, and who serves a miss.

A policy decides; ``tide.lowering`` turns its decision into ops. Each policy keeps its own
per-layer state (``LayerState``: the expert in every slot, and a clock for LRU), and
``Policy.place`` returns a ``Placement`` for one layer of one forward pass:

* ``copies``: (expert, slot, evicted expert) in issue order,
* ``hits``: (expert, tokens) served by experts that were resident when the routing arrived,
* ``fetched``: (expert, tokens) served on the GPU by experts copied in this pass,
* ``cpu``: (expert, tokens) served on the CPU.

A hit is an assignment whose expert was resident before this pass changed anything, so
experts promoted by a refresh count as misses in the pass that promotes them.

Policies (``POLICIES``): ``all-gpu``, ``tide``, ``every-step``, ``static``, ``lru-fetch``,
``cpu-experts`` and ``oracle``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from tide.errors import InputError
from tide.ir import ForwardInfo, Overlap, Plan

# ---------------------------------------------------------------------------------------
# State


@dataclass
class LayerState:
    """The slots of one MoE layer. ``slots[s]`` is the expert in slot s, or -1 when empty."""

    slots: list[int]
    slot_of: dict[int, int] = field(default_factory=dict)
    last_used: dict[int, int] = field(default_factory=dict)  # expert -> LRU clock value

    @classmethod
    def with_residents(cls, budget: int, residents: Iterable[int]) -> "LayerState":
        residents = list(residents)
        if len(residents) > budget:
            raise ValueError(f"{len(residents)} resident experts do not fit in {budget} slots")
        slots = residents + [-1] * (budget - len(residents))
        return cls(slots=slots, slot_of={e: s for s, e in enumerate(residents)})

    @property
    def resident(self) -> set[int]:
        return set(self.slot_of)

    def put(self, expert: int, slot: int) -> int:
        """Place ``expert`` in ``slot`` and return the expert it evicts (-1 for none)."""
        evicted = self.slots[slot]
        if evicted >= 0:
            del self.slot_of[evicted]
        self.slots[slot] = expert
        self.slot_of[expert] = slot
        return evicted


@dataclass
class PolicyState:
    """Per-layer state of one run, plus the LRU clock."""

    layers: list[LayerState]
    clock: int = 0


@dataclass
class Placement:
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (expert, slot, evicted)
    hits: list[tuple[int, int]] = field(default_factory=list)
    fetched: list[tuple[int, int]] = field(default_factory=list)
    cpu: list[tuple[int, int]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Shared mechanics


def is_refresh_pass(plan: Plan, forward: ForwardInfo, moe_index: int) -> bool:
    """Return whether an interval policy refreshes this layer in this forward pass.

    The prompt's pass always refreshes; a cache-write pass never does. In a denoising pass
    the explicit refresh steps decide when the plan has them, else the interval does
    (step 0, τ, 2τ, ...). With ``first_block_rule == "every-step"`` the first generated
    block of each sequence refreshes at every step.
    """
    if forward.kind == "prefill":
        return True
    if forward.kind == "cache_write":
        return False
    if plan.first_block_rule == "every-step" and forward.block == 0:
        return True
    if plan.refresh_steps is not None:
        return forward.step in plan.refresh_steps
    return forward.step % plan.intervals[moe_index] == 0


def refresh_to(state: LayerState, target: Sequence[int], tokens: np.ndarray) -> list[tuple[int, int, int]]:
    """Promote the experts of ``target`` that are not resident, and return the copies.

    Empty slots are filled first. After that, each promotion demotes one resident expert
    outside ``target``: fewest tokens in this pass first, then the lowest id, so only as
    many experts are demoted as are promoted.
    """
    target_set = set(target)
    promote = [e for e in target if e not in state.slot_of]
    if not promote:
        return []
    empty = [s for s, e in enumerate(state.slots) if e < 0] if min(state.slots, default=0) < 0 else []
    victims = sorted((e for e in state.slot_of if e not in target_set), key=lambda e: (int(tokens[e]), e))
    copies = []
    for expert in promote:
        if empty:
            slot = empty.pop(0)
        elif victims:
            slot = state.slot_of[victims.pop(0)]
        else:
            raise ValueError(f"target of {len(target)} experts does not fit in {len(state.slots)} slots")
        copies.append((expert, slot, state.put(expert, slot)))
    return copies


def split_by_residency(state: LayerState, active: Sequence[int], tokens: np.ndarray,
                       resident_before: set[int], fetched: set[int]) -> Placement:
    """Serve resident experts on the GPU and the rest on the CPU."""
    placement = Placement()
    counts = tokens.tolist()  # Python ints: indexing a list is far cheaper than a NumPy array
    slot_of = state.slot_of
    fetched_pairs, hit_pairs, cpu_pairs = placement.fetched, placement.hits, placement.cpu
    for expert in active:
        pair = (expert, counts[expert])
        if expert in fetched:
            fetched_pairs.append(pair)
        elif expert in slot_of:
            (hit_pairs if expert in resident_before else fetched_pairs).append(pair)
        else:
            cpu_pairs.append(pair)
    return placement


def fetch_misses(state: LayerState, policy_state: PolicyState, active: Sequence[int],
                 tokens: np.ndarray) -> Placement:
    """Copy every non-resident active expert into a slot before use, evicting LRU experts.

    A copy takes the first empty slot. Without one, it evicts the least recently used
    expert that this pass does not need. When every resident expert is needed, it evicts
    the one this pass used earliest, and the lowering makes the copy wait for that reader.
    """
    placement = Placement()
    resident_before = set(state.slot_of)
    active_set = set(active)
    policy_state.clock += 1
    for expert in active:
        if expert in resident_before:
            placement.hits.append((expert, int(tokens[expert])))
            state.last_used[expert] = policy_state.clock
    missing = [e for e in active if e not in resident_before]
    if not missing:
        return placement
    if not state.slots:
        placement.cpu.extend((e, int(tokens[e])) for e in missing)
        return placement
    used_in_pass = [e for e, _ in placement.hits]
    for expert in missing:
        empty = [s for s, e in enumerate(state.slots) if e < 0]
        if empty:
            slot = empty[0]
        else:
            idle = [e for e in state.slot_of if e not in active_set]
            if idle:
                victim = min(idle, key=lambda e: (state.last_used.get(e, -1), e))
            else:
                # Every resident expert is needed in this pass: reuse the one that was used earliest.
                victim = next(e for e in used_in_pass if e in state.slot_of)
            slot = state.slot_of[victim]
        evicted = state.put(expert, slot)
        if evicted >= 0:
            state.last_used.pop(evicted, None)
        state.last_used[expert] = policy_state.clock
        placement.copies.append((expert, slot, evicted))
        placement.fetched.append((expert, int(tokens[expert])))
        used_in_pass.append(expert)
    return placement


def active_experts(tokens: np.ndarray) -> list[int]:
    """Experts with at least one token, in id order."""
    return np.flatnonzero(tokens).tolist()


# ---------------------------------------------------------------------------------------
# Policies


class Policy:
    """One placement policy. Subclasses set ``name`` and override ``place``."""

    name = ""
    description = ""

    def initial_residents(self, plan: Plan, moe_index: int, num_experts: int) -> list[int]:
        return []

    def initial_state(self, plan: Plan, num_experts: int) -> PolicyState:
        layers = [LayerState.with_residents(plan.slot_budgets[i], self.initial_residents(plan, i, num_experts))
                  for i in range(plan.num_moe_layers)]
        return PolicyState(layers=layers)

    def place(self, plan: Plan, state: PolicyState, forward: ForwardInfo, moe_index: int,
              tokens: np.ndarray) -> Placement:
        raise NotImplementedError


class AllGpu(Policy):
    name = "all-gpu"
    description = "every expert resident on the GPU (the no-offload upper bound)"

    def initial_residents(self, plan: Plan, moe_index: int, num_experts: int) -> list[int]:
        if plan.slot_budgets[moe_index] < num_experts:
            raise InputError(f"all-gpu needs all {num_experts} experts of every MoE layer resident, but MoE layer "
                             f"{moe_index} has {plan.slot_budgets[moe_index]} slots", field="slot_budgets",
                             value=plan.slot_budgets[moe_index], accepted=f">= {num_experts}")
        return list(range(num_experts))

    def place(self, plan, state, forward, moe_index, tokens):
        return Placement(hits=[(e, int(tokens[e])) for e in active_experts(tokens)])


class Interval(Policy):
    """Refresh to the top slot-budget experts by routed tokens every τ steps; misses per the plan."""

    name = "tide"
    description = "refresh every τ steps to the top experts by routed tokens; misses on the CPU"

    def place(self, plan, state, forward, moe_index, tokens):
        layer = state.layers[moe_index]
        active = active_experts(tokens)
        resident_before = set(layer.slot_of)
        copies: list[tuple[int, int, int]] = []
        budget = plan.slot_budgets[moe_index]
        if budget > 0 and is_refresh_pass(plan, forward, moe_index):
            # Most tokens first; the sort is stable and ``active`` ascends, so ties go to the lower id.
            ranked = sorted(active, key=tokens.tolist().__getitem__, reverse=True)[:budget]
            copies = refresh_to(layer, ranked, tokens)
        if plan.miss_service[moe_index] == "fetch":
            placement = fetch_misses(layer, state, active, tokens)
            # Experts promoted by the refresh were misses when the routing arrived.
            promoted = {e for e, _, _ in copies}
            placement.hits = [(e, n) for e, n in placement.hits if e not in promoted]
            placement.fetched = [(e, int(tokens[e])) for e, _, _ in copies] + placement.fetched
            placement.copies = copies + placement.copies
            return placement
        placement = split_by_residency(layer, active, tokens, resident_before, {e for e, _, _ in copies})
        placement.copies = copies
        return placement


class EveryStep(Interval):
    name = "every-step"
    description = "tide with τ = 1: re-place the resident set at every step"


class Static(Policy):
    name = "static"
    description = "a fixed hot set from a profiling trace; misses on the CPU"

    def initial_residents(self, plan, moe_index, num_experts):
        return list(plan.static_sets[moe_index])

    def place(self, plan, state, forward, moe_index, tokens):
        layer = state.layers[moe_index]
        resident = set(layer.slot_of)
        return split_by_residency(layer, active_experts(tokens), tokens, resident, set())


class LruFetch(Policy):
    name = "lru-fetch"
    description = "per-layer LRU cache; every miss is copied to the GPU before use"

    def place(self, plan, state, forward, moe_index, tokens):
        return fetch_misses(state.layers[moe_index], state, active_experts(tokens), tokens)


class CpuExperts(Policy):
    name = "cpu-experts"
    description = "no routed expert on the GPU; all routed experts on the CPU"

    def place(self, plan, state, forward, moe_index, tokens):
        return Placement(cpu=[(e, int(tokens[e])) for e in active_experts(tokens)])


class Oracle(Policy):
    name = "oracle"
    description = "per-pass resident sets chosen offline with the whole trace known"

    def place(self, plan, state, forward, moe_index, tokens):
        layer = state.layers[moe_index]
        active = active_experts(tokens)
        resident_before = set(layer.slot_of)
        target = plan.placements.get(forward.index)
        copies: list[tuple[int, int, int]] = []
        if target is not None:
            wanted = list(target[moe_index])
            if len(wanted) > plan.slot_budgets[moe_index]:
                raise InputError(f"oracle placement of forward {forward.index} has {len(wanted)} experts for "
                                 f"{plan.slot_budgets[moe_index]} slots", field=f"placements[{forward.index}]"
                                 f"[{moe_index}]", value=len(wanted))
            copies = refresh_to(layer, wanted, tokens)
        placement = split_by_residency(layer, active, tokens, resident_before, {e for e, _, _ in copies})
        placement.copies = copies
        return placement


POLICIES: dict[str, Policy] = {p.name: p for p in (AllGpu(), Interval(), EveryStep(), Static(), LruFetch(),
                                                     CpuExperts(), Oracle())}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise InputError("unknown policy", field="policy", value=name, accepted=", ".join(POLICIES))
    return POLICIES[name]


# ---------------------------------------------------------------------------------------
# Plans for the policies


def hot_sets_from_trace(trace, budgets: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Choose each layer's hot set: its most routed experts over the whole profiling trace."""
    num_experts = trace.metadata.num_experts
    hot = []
    for layer, budget in enumerate(budgets):
        counts = np.bincount(trace.experts[:, layer, :].ravel().astype(np.int64), minlength=num_experts)
        ranked = sorted(range(num_experts), key=lambda e: (-int(counts[e]), e))
        hot.append(tuple(sorted(ranked[:budget])))
    return tuple(hot)


def make_plan(policy: str, spec, *, slot_budget: int | Sequence[int] | None = None, interval: int = 2,
              first_block_rule: str = "every-step", overlap: Overlap | None = None,
              profiling_trace=None, placements=None, miss_service: str | None = None,
              refresh_steps: Sequence[int] | None = None, provenance: dict | None = None) -> Plan:
    """Build a plan for ``policy`` with uniform settings over all MoE layers.

    ``slot_budget`` is slots per MoE layer (one number or one per layer); ``all-gpu``
    always gets every expert and ``cpu-experts`` none. ``static`` needs a profiling trace
    to choose its hot sets from.
    """
    get_policy(policy)
    num_layers = spec.num_moe_layers
    if policy == "all-gpu":
        budgets = (spec.num_experts,) * num_layers
    elif policy == "cpu-experts":
        budgets = (0,) * num_layers
    elif slot_budget is None:
        raise InputError(f"policy {policy} needs a slot budget", field="slot_budget", value=None)
    elif isinstance(slot_budget, int):
        budgets = (slot_budget,) * num_layers
    else:
        budgets = tuple(int(b) for b in slot_budget)
    for i, budget in enumerate(budgets):
        if not 0 <= budget <= spec.num_experts:
            raise InputError(f"MoE layer {i}: slot budget outside 0..{spec.num_experts}", field="slot_budget",
                             value=budget, accepted=f"0 to {spec.num_experts}")
    if policy == "every-step":
        interval = 1
    if interval < 1:
        raise InputError("the refresh interval must be at least 1", field="interval", value=interval)
    service = miss_service or ("fetch" if policy == "lru-fetch" else "cpu")
    static_sets = None
    if policy == "static":
        if profiling_trace is None:
            raise InputError("the static policy needs a profiling trace to choose hot sets", field="profiling_trace")
        static_sets = hot_sets_from_trace(profiling_trace, budgets)
    return Plan(
        policy=policy,
        slot_budgets=budgets,
        intervals=(interval,) * num_layers,
        miss_service=(service,) * num_layers,
        refresh_steps=tuple(refresh_steps) if refresh_steps is not None else None,
        first_block_rule=first_block_rule,
        overlap=overlap or Overlap(),
        static_sets=static_sets,
        placements=placements,
        spec_name=spec.name,
        spec_hash=spec.config_hash,
        provenance=provenance or {},
    )


def check_plan_matches_spec(plan: Plan, spec, source: str = "plan") -> None:
    if plan.num_moe_layers != spec.num_moe_layers:
        raise InputError(f"plan has {plan.num_moe_layers} MoE layers but model '{spec.name}' has "
                         f"{spec.num_moe_layers}", source=source, field="slot_budgets", value=plan.num_moe_layers,
                         accepted=str(spec.num_moe_layers))
    for i, budget in enumerate(plan.slot_budgets):
        if budget > spec.num_experts:
            raise InputError(f"MoE layer {i} has more slots than the model's {spec.num_experts} experts",
                             source=source, field=f"slot_budgets[{i}]", value=budget)
