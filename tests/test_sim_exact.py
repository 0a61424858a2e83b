"""Exact simulated times on small hand-built schedules with round-number durations.

Durations are whole microseconds, and every expected start and end below is computed by
hand from the rules of the model. A lane runs its ops in schedule order, and an op starts
once its lane is free and its dependencies have ended. Passes run one after another, and
a copy into a slot waits for the last reader of the expert it evicts.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from sim import simulate_schedules
from sim.engine import compile_schedules, run_program
from helpers import make_trace, small_spec
from tide.ir import LANES, OP_LANES, ForwardInfo, Op, Overlap, Schedule
from tide.lowering import lower_trace
from tide.policies import make_plan

US = 1e-6


class RoundCosts:
    """Durations in whole microseconds: by op id where given, else by op kind."""

    def __init__(self, by_kind: dict[str, int], by_id: dict[str, int] | None = None) -> None:
        self.by_kind = by_kind
        self.by_id = by_id or {}

    def duration_s(self, op: Op) -> float:
        return self.by_id.get(op.id, self.by_kind.get(op.kind, 0)) * US


def op(op_id: str, kind: str, deps=(), layer=-1, **values) -> Op:
    return Op(op_id, kind, OP_LANES[kind], tuple(deps), layer, **values)


def schedule(ops, index=0) -> Schedule:
    return Schedule(ForwardInfo(index=index, kind="denoise", block=0, step=index, num_tokens=1, context_tokens=1,
                                committed_tokens=1), tuple(ops))


def in_us(seconds):
    """Convert seconds, or a dict of seconds, to whole microseconds."""
    if isinstance(seconds, dict):
        return {key: in_us(value) for key, value in seconds.items()}
    if isinstance(seconds, list):
        return [in_us(value) for value in seconds]
    return round(seconds / US)


def times_us(result, forward=0) -> dict[str, tuple[int, int]]:
    """Return op id -> (start, end) in whole microseconds for one forward pass."""
    return {s.op_id: (round(s.start_s / US), round(s.end_s / US)) for s in result.timeline.spans
            if s.forward == forward}


def test_copies_on_one_lane_run_back_to_back():
    ops = [op(f"L01.copy.e{e}", "expert_copy", layer=1, slot=e, evicts=-1, experts=((e, 0),)) for e in range(3)]
    result = simulate_schedules([schedule(ops)], RoundCosts({"expert_copy": 25}))
    assert times_us(result) == {"L01.copy.e0": (0, 25), "L01.copy.e1": (25, 50), "L01.copy.e2": (50, 75)}
    assert result.total_ns == 75_000
    assert in_us(result.lane_busy_s["h2d"]) == 75
    assert result.critical_lane == "h2d"


def test_copy_overlaps_gpu_work():
    ops = [
        op("L01.attention", "attention", layer=1),
        op("L01.copy.e4", "expert_copy", layer=1, slot=0, evicts=-1, experts=((4, 2),)),
        op("L01.gpu_expert.e4", "gpu_expert", ("L01.attention", "L01.copy.e4"), layer=1, tokens=2,
           experts=((4, 2),)),
    ]
    costs = RoundCosts({"attention": 40, "expert_copy": 25, "gpu_expert": 10})
    result = simulate_schedules([schedule(ops)], costs)
    assert times_us(result) == {"L01.attention": (0, 40), "L01.copy.e4": (0, 25), "L01.gpu_expert.e4": (40, 50)}
    assert result.total_ns == 50_000

    # A copy longer than the GPU work delays the expert that needs it.
    slow = RoundCosts({"attention": 40, "expert_copy": 60, "gpu_expert": 10})
    result = simulate_schedules([schedule(ops)], slow)
    assert times_us(result)["L01.gpu_expert.e4"] == (60, 70)
    assert result.critical_lane == "h2d"


def test_cpu_and_gpu_experts_run_in_parallel():
    ops = [
        op("L01.router", "router", layer=1),
        op("L01.act_d2h", "act_d2h", ("L01.router",), layer=1),
        op("L01.cpu_experts", "cpu_experts", ("L01.act_d2h",), layer=1, tokens=3, experts=((5, 3),)),
        op("L01.gpu_experts", "gpu_experts", ("L01.router",), layer=1, tokens=4, experts=((0, 4),)),
        op("L01.act_h2d", "act_h2d", ("L01.cpu_experts",), layer=1),
        op("L01.combine", "combine", ("L01.gpu_experts", "L01.act_h2d"), layer=1),
    ]
    costs = RoundCosts({"router": 10, "act_d2h": 5, "cpu_experts": 30, "gpu_experts": 20, "act_h2d": 5,
                        "combine": 10})
    result = simulate_schedules([schedule(ops)], costs)
    assert times_us(result) == {
        "L01.router": (0, 10),
        "L01.act_d2h": (10, 15),
        "L01.cpu_experts": (15, 45),
        "L01.gpu_experts": (10, 30),
        "L01.act_h2d": (45, 50),
        "L01.combine": (50, 60),
    }
    assert result.total_ns == 60_000
    # The critical path is router, act_d2h, cpu_experts, act_h2d, combine: 30 of its 60 us on the CPU.
    assert in_us(result.critical_path_s) == {"gpu": 20, "h2d": 5, "d2h": 5, "cpu": 30}
    assert result.critical_lane == "cpu"
    assert in_us(result.lane_busy_s["gpu"]) == 40
    assert result.hits == 4
    assert result.misses == 3


def reuse_schedule(evicted: int) -> Schedule:
    """A layer with slots [0, 1]: the GPU reads experts 0 and 1, then expert 2 replaces ``evicted``.

    The copy lists only the router as a dependency, so any wait for a reader comes from the
    engine's slot tracking.
    """
    return schedule([
        op("L01.router", "router", layer=1),
        op("L01.gpu_experts", "gpu_experts", ("L01.router",), layer=1, tokens=2, experts=((0, 1), (1, 1))),
        op("L01.copy.e2", "expert_copy", ("L01.router",), layer=1, slot=0 if evicted == 0 else 1, evicts=evicted,
           experts=((2, 1),)),
        op("L01.gpu_expert.e2", "gpu_expert", ("L01.copy.e2",), layer=1, tokens=1, experts=((2, 1),)),
    ])


def test_slot_reused_only_after_last_reader():
    costs = RoundCosts({"router": 10, "gpu_experts": 40, "expert_copy": 25, "gpu_expert": 10})
    result = simulate_schedules([reuse_schedule(evicted=0)], costs, initial_slots={1: [0, 1]})
    assert times_us(result) == {
        "L01.router": (0, 10),
        "L01.gpu_experts": (10, 50),
        "L01.copy.e2": (50, 75),
        "L01.gpu_expert.e2": (75, 85),
    }
    assert result.total_ns == 85_000


def test_slot_of_unread_expert_reused_at_once():
    # Expert 3 is resident but no op reads it, so its slot is free as soon as the router is done.
    ops = list(reuse_schedule(evicted=0).ops)
    ops[2] = op("L01.copy.e2", "expert_copy", ("L01.router",), layer=1, slot=2, evicts=3, experts=((2, 1),))
    costs = RoundCosts({"router": 10, "gpu_experts": 40, "expert_copy": 25, "gpu_expert": 10})
    result = simulate_schedules([schedule(ops)], costs, initial_slots={1: [0, 1, 3]})
    assert times_us(result)["L01.copy.e2"] == (10, 35)
    assert times_us(result)["L01.gpu_expert.e2"] == (50, 60)


def test_slot_reused_after_reader_of_earlier_pass():
    # Pass 0 reads expert 0 for 40 us; pass 1 copies expert 2 over it at once.
    first = schedule([op("L01.gpu_experts", "gpu_experts", (), layer=1, tokens=1, experts=((0, 1),)),
                      op("L01.combine", "combine", (), layer=1)], index=0)
    second = schedule([op("L01.copy.e2", "expert_copy", (), layer=1, slot=0, evicts=0, experts=((2, 0),))],
                      index=1)
    costs = RoundCosts({"gpu_experts": 40, "combine": 5, "expert_copy": 25})
    result = simulate_schedules([first, second], costs, initial_slots={1: [0]})
    assert times_us(result, forward=0) == {"L01.gpu_experts": (0, 40), "L01.combine": (40, 45)}
    assert times_us(result, forward=1) == {"L01.copy.e2": (45, 70)}
    assert in_us(result.forward_times_s) == [45, 25]


def test_copy_that_contradicts_slot_rejected():
    bad = schedule([op("L01.copy.e2", "expert_copy", (), layer=1, slot=0, evicts=5, experts=((2, 0),))])
    with pytest.raises(ValueError, match="contains expert 0, but the copy evicts 5"):
        simulate_schedules([bad], RoundCosts({}), initial_slots={1: [0, 1]})


def test_read_of_absent_expert_rejected():
    bad = schedule([op("L01.gpu_experts", "gpu_experts", (), layer=1, tokens=1, experts=((4, 1),))])
    with pytest.raises(ValueError, match="reads expert 4 of layer 1, which is in no slot"):
        simulate_schedules([bad], RoundCosts({}), initial_slots={1: [0, 1]})


def test_dependency_on_later_op_rejected():
    bad = schedule([op("a", "attention", ("b",)), op("b", "router")])
    with pytest.raises(ValueError, match="not an earlier op"):
        simulate_schedules([bad], RoundCosts({}))


def test_negative_duration_rejected():
    with pytest.raises(ValueError, match="not a finite number >= 0"):
        simulate_schedules([schedule([op("a", "attention")])], RoundCosts({"attention": -1}))


# ---------------------------------------------------------------------------------------
# A refresh every τ steps, through the real lowering

# Costs in us per op kind; every kind the lowering emits has one.
LOWERED_COSTS = {"embed": 1, "attention": 10, "dense_mlp": 5, "router": 2, "shared_expert": 4, "expert_copy": 8,
                 "gpu_experts": 6, "gpu_expert": 3, "act_d2h": 2, "cpu_experts": 20, "act_h2d": 2, "combine": 1,
                 "head": 6}


def refresh_trace():
    """Prefill and four steps of one block; every token of both MoE layers routes to one expert pair."""
    spec = small_spec()
    pairs = [(0, 1), (2, 3), (4, 5), (4, 5), (0, 1)]
    routings = [np.tile(np.array(pair, dtype=np.int16), (2, spec.num_moe_layers, 1)) for pair in pairs]
    return spec, make_trace(spec, routings)


def test_refresh_every_tau_steps():
    # τ = 2 with slot budget 2: the prefill and steps 0 and 2 copy the pair in, steps 1 and 3 run it on the CPU.
    spec, trace = refresh_trace()
    plan = make_plan("tide", spec, slot_budget=2, interval=2, first_block_rule="interval")
    schedules = list(lower_trace(plan, spec, trace))
    initial = {layer: [-1, -1] for layer in spec.moe_layers}
    result = simulate_schedules(schedules, RoundCosts(LOWERED_COSTS), initial_slots=initial)

    copies_per_pass = [sum(o.kind == "expert_copy" for o in s.ops) for s in schedules]
    assert copies_per_pass == [4, 4, 0, 4, 0]

    # A refresh pass: per MoE layer attention, router, shared expert, then copy A, run A,
    # copy B, run B, combine. Copy B overlaps run A; each run waits for its copy.
    assert times_us(result, forward=1) == {
        "embed": (86, 87), "L00.attention": (87, 97), "L00.dense_mlp": (97, 102),
        "L01.attention": (102, 112), "L01.router": (112, 114), "L01.shared_expert": (114, 118),
        "L01.copy.e2": (114, 122), "L01.gpu_expert.e2": (122, 125),
        "L01.copy.e3": (122, 130), "L01.gpu_expert.e3": (130, 133), "L01.combine": (133, 134),
        "L02.attention": (134, 144), "L02.router": (144, 146), "L02.shared_expert": (146, 150),
        "L02.copy.e2": (146, 154), "L02.gpu_expert.e2": (154, 157),
        "L02.copy.e3": (154, 162), "L02.gpu_expert.e3": (162, 165), "L02.combine": (165, 166),
        "head": (166, 172),
    }
    # A pass between refreshes: the CPU path (act_d2h, cpu_experts, act_h2d) overlaps the shared expert.
    assert times_us(result, forward=2) == {
        "embed": (172, 173), "L00.attention": (173, 183), "L00.dense_mlp": (183, 188),
        "L01.attention": (188, 198), "L01.router": (198, 200), "L01.act_d2h": (200, 202),
        "L01.cpu_experts": (202, 222), "L01.shared_expert": (200, 204), "L01.act_h2d": (222, 224),
        "L01.combine": (224, 225),
        "L02.attention": (225, 235), "L02.router": (235, 237), "L02.act_d2h": (237, 239),
        "L02.cpu_experts": (239, 259), "L02.shared_expert": (237, 241), "L02.act_h2d": (259, 261),
        "L02.combine": (261, 262),
        "head": (262, 268),
    }
    assert in_us(result.forward_times_s) == [86, 86, 96, 86, 96]
    assert result.total_ns == 450_000
    # Tokens of refresh passes are misses (their experts arrive in that pass); no pass has a hit.
    assert result.hits == 0
    assert result.misses == 5 * 2 * 2 * 2
    assert result.expert_copies == 12


def test_sequential_overlap_runs_nothing_at_once():
    spec, trace = refresh_trace()
    plan = make_plan("tide", spec, slot_budget=2, interval=2, first_block_rule="interval",
                     overlap=Overlap(copies_with_compute=False, cpu_with_gpu=False))
    schedules = list(lower_trace(plan, spec, trace))
    result = simulate_schedules(schedules, RoundCosts(LOWERED_COSTS))
    total_us = sum(LOWERED_COSTS[o.kind] for s in schedules for o in s.ops)
    assert result.total_ns == total_us * 1000
    spans = sorted(result.timeline.spans, key=lambda s: s.start_s)
    for before, after in zip(spans, spans[1:]):
        assert before.end_s <= after.start_s


# ---------------------------------------------------------------------------------------
# The SimPy model against the recurrence it must satisfy


def reference_times(schedules, costs) -> list[tuple[int, int]]:
    """Start and end in ns of every op: start = max(its lane's previous end, its deps' ends, pass start)."""
    times = []
    pass_start = 0
    for sched in schedules:
        lane_free = dict.fromkeys(LANES, pass_start)
        end_of = {}
        pass_end = pass_start
        for o in sched.ops:
            start = max([lane_free[o.lane]] + [end_of[d] for d in o.deps])
            end = start + round(costs.duration_s(o) * 1e9)
            lane_free[o.lane] = end_of[o.id] = end
            pass_end = max(pass_end, end)
            times.append((start, end))
        pass_start = pass_end
    return times


def random_schedules(seed: int, num_passes: int = 4, num_ops: int = 40):
    rng = random.Random(seed)
    kinds = ["attention", "router", "act_d2h", "cpu_experts", "act_h2d", "combine"]
    schedules = []
    for index in range(num_passes):
        ops = []
        for i in range(num_ops):
            earlier = [o.id for o in ops]
            deps = rng.sample(earlier, k=min(len(earlier), rng.randint(0, 3)))
            ops.append(op(f"op{i}", rng.choice(kinds), deps))
        schedules.append(schedule(ops, index=index))
    return schedules


@pytest.mark.parametrize("seed", range(5))
def test_engine_matches_recurrence(seed):
    schedules = random_schedules(seed)
    rng = random.Random(seed)
    costs = RoundCosts({}, {f"op{i}": rng.randint(0, 50) for i in range(40)})
    run = run_program(compile_schedules(schedules, costs))
    assert list(zip(run.start_ns, run.end_ns)) == reference_times(schedules, costs)
