"""Exact ops that lowering emits for each policy on small hand-built routings.

The spec has a dense layer 0 and MoE layers 1 and 2 with 6 experts and top-2. Routings
below are [T, L, K]: three tokens, two MoE layers, two experts per token.
"""

import dataclasses

import numpy as np
import pytest

from tide.errors import InputError
from tide.ir import ForwardInfo, Overlap
from tide.lowering import Lowering, schedule_stats
from tide.policies import make_plan

from helpers import make_trace, small_spec

SPEC = small_spec()
LAYER2 = [[4, 5], [4, 5], [4, 5]]  # MoE layer 2 routing, the same in every pass


def routing(layer1):
    return np.stack([np.array(layer1), np.array(LAYER2)], axis=1)


PREFILL = ForwardInfo(index=0, kind="prefill", num_tokens=3, context_tokens=3)
STEP0 = ForwardInfo(index=1, kind="denoise", block=1, step=0, num_tokens=3, context_tokens=6, committed_tokens=1)
STEP1 = ForwardInfo(index=2, kind="denoise", block=1, step=1, num_tokens=3, context_tokens=6, committed_tokens=1)
ROUTE_PREFILL = routing([[0, 1], [0, 2], [0, 1]])  # e0 3, e1 2, e2 1
ROUTE_STEP0 = routing([[2, 3], [2, 3], [0, 2]])  # e2 3, e3 2, e0 1
ROUTE_STEP1 = routing([[2, 3], [2, 4], [3, 4]])  # e2 2, e3 2, e4 2


def layer_ops(schedule, layer=1):
    return [op for op in schedule.ops if op.layer == layer]


def ids(ops):
    return [op.id.split(".", 1)[1] for op in ops]


def by_id(schedule):
    return {op.id: op for op in schedule.ops}


def test_tide_refresh_promotes_and_demotes():
    plan = make_plan("tide", SPEC, slot_budget=2, interval=2, first_block_rule="interval")
    lowering = Lowering(plan, SPEC)

    prefill = lowering.lower_forward(PREFILL, ROUTE_PREFILL)
    prefill.validate()
    assert ids(layer_ops(prefill)) == ["attention", "router", "act_d2h", "cpu_experts", "shared_expert",
                                       "copy.e0", "gpu_expert.e0", "copy.e1", "gpu_expert.e1", "act_h2d", "combine"]
    ops = by_id(prefill)
    assert (ops["L01.copy.e0"].slot, ops["L01.copy.e0"].evicts) == (0, -1)
    assert (ops["L01.copy.e1"].slot, ops["L01.copy.e1"].evicts) == (1, -1)
    assert ops["L01.cpu_experts"].experts == ((2, 1),)
    assert ops["L01.gpu_expert.e0"].experts == ((0, 3),)
    assert ops["L01.gpu_expert.e0"].deps == ("L01.copy.e0",)
    assert ops["L01.copy.e0"].bytes == SPEC.expert_bytes()

    step0 = lowering.lower_forward(STEP0, ROUTE_STEP0)
    ops = by_id(step0)
    # Top-2 is {2, 3}: expert 1 (no tokens) is demoted first, then expert 0 (one token).
    assert (ops["L01.copy.e2"].slot, ops["L01.copy.e2"].evicts) == (1, 1)
    assert (ops["L01.copy.e3"].slot, ops["L01.copy.e3"].evicts) == (0, 0)
    assert ops["L01.cpu_experts"].experts == ((0, 1),)
    assert "L01.gpu_experts" not in ops

    step1 = lowering.lower_forward(STEP1, ROUTE_STEP1)
    ops = by_id(step1)
    assert ids(layer_ops(step1)) == ["attention", "router", "act_d2h", "cpu_experts", "shared_expert",
                                     "gpu_experts", "act_h2d", "combine"]
    assert ops["L01.gpu_experts"].experts == ((2, 2), (3, 2))
    assert ops["L01.cpu_experts"].experts == ((4, 2),)
    assert set(ops["L01.combine"].deps) == {"L01.shared_expert", "L01.gpu_experts", "L01.act_h2d"}
    stats = schedule_stats(step1)
    assert stats["expert_copies"] == 0
    assert stats["hits"] == 4 + 6  # layer 1: experts 2 and 3; layer 2: experts 4 and 5 stay resident


def test_tide_interval_skips_refresh_until_next_multiple():
    plan = make_plan("tide", SPEC, slot_budget=2, interval=2, first_block_rule="interval")
    lowering = Lowering(plan, SPEC)
    lowering.lower_forward(PREFILL, ROUTE_PREFILL)
    step1 = ForwardInfo(index=1, kind="denoise", block=1, step=1, num_tokens=3, context_tokens=6)
    ops = by_id(lowering.lower_forward(step1, ROUTE_STEP0))
    assert not any(op.kind == "expert_copy" for op in ops.values())
    assert ops["L01.gpu_experts"].experts == ((0, 1),)
    assert ops["L01.cpu_experts"].experts == ((2, 3), (3, 2))


def test_first_block_rule_refreshes_every_step():
    plan = make_plan("tide", SPEC, slot_budget=2, interval=4, first_block_rule="every-step")
    lowering = Lowering(plan, SPEC)
    lowering.lower_forward(PREFILL, ROUTE_PREFILL)
    first_block_step3 = ForwardInfo(index=1, kind="denoise", block=0, step=3, num_tokens=3, context_tokens=6)
    ops = by_id(lowering.lower_forward(first_block_step3, ROUTE_STEP0))
    assert "L01.copy.e2" in ops
    assert "L01.copy.e3" in ops


def test_cache_write_never_refreshes():
    plan = make_plan("every-step", SPEC, slot_budget=2)
    lowering = Lowering(plan, SPEC)
    lowering.lower_forward(PREFILL, ROUTE_PREFILL)
    write = ForwardInfo(index=1, kind="cache_write", block=0, num_tokens=3, context_tokens=6)
    ops = by_id(lowering.lower_forward(write, ROUTE_STEP0))
    assert not any(op.kind == "expert_copy" for op in ops.values())


def test_all_gpu_only_hits():
    plan = make_plan("all-gpu", SPEC)
    schedule = Lowering(plan, SPEC).lower_forward(PREFILL, ROUTE_PREFILL)
    assert ids(layer_ops(schedule)) == ["attention", "router", "shared_expert", "gpu_experts", "combine"]
    assert by_id(schedule)["L01.gpu_experts"].experts == ((0, 3), (1, 2), (2, 1))


def test_all_gpu_rejects_too_few_slots():
    plan = dataclasses.replace(make_plan("tide", SPEC, slot_budget=2), policy="all-gpu")
    with pytest.raises(InputError, match="all-gpu"):
        Lowering(plan, SPEC)


def test_cpu_experts_only_cpu():
    plan = make_plan("cpu-experts", SPEC)
    schedule = Lowering(plan, SPEC).lower_forward(PREFILL, ROUTE_PREFILL)
    ops = by_id(schedule)
    assert ids(layer_ops(schedule)) == ["attention", "router", "act_d2h", "cpu_experts", "shared_expert",
                                        "act_h2d", "combine"]
    assert ops["L01.cpu_experts"].experts == ((0, 3), (1, 2), (2, 1))
    assert ops["L01.act_d2h"].bytes == 3 * SPEC.hidden_size * 2
    assert ops["L01.act_h2d"].bytes == 6 * SPEC.hidden_size * 2


def test_static_hot_set_from_profiling_trace():
    trace = make_trace(SPEC, [ROUTE_PREFILL, ROUTE_STEP0, ROUTE_STEP1])
    plan = make_plan("static", SPEC, slot_budget=2, profiling_trace=trace)
    assert plan.static_sets == ((0, 2), (4, 5))  # layer 1 totals: e2 6, e0 4, e3 4, e1 2 (ties by id)
    schedule = Lowering(plan, SPEC).lower_forward(STEP1, ROUTE_STEP1)
    ops = by_id(schedule)
    assert ops["L01.gpu_experts"].experts == ((2, 2),)
    assert ops["L01.cpu_experts"].experts == ((3, 2), (4, 2))
    assert not any(op.kind == "expert_copy" for op in ops.values())


def test_lru_fetch_reuses_slot_after_reader():
    plan = make_plan("lru-fetch", SPEC, slot_budget=1)
    lowering = Lowering(plan, SPEC)
    schedule = lowering.lower_forward(PREFILL, ROUTE_PREFILL)
    schedule.validate()
    ops = by_id(schedule)
    assert ids(layer_ops(schedule)) == ["attention", "router", "shared_expert", "copy.e0", "gpu_expert.e0",
                                        "copy.e1", "gpu_expert.e1", "copy.e2", "gpu_expert.e2", "combine"]
    # One slot: each copy after the first waits for the previous expert's run.
    assert ops["L01.copy.e1"].evicts == 0
    assert ops["L01.copy.e1"].deps == ("L01.router", "L01.gpu_expert.e0")
    assert ops["L01.copy.e2"].deps == ("L01.router", "L01.gpu_expert.e1")
    # Next pass: expert 2 is resident (a hit); 3 is fetched into its slot after the hits run.
    ops = by_id(lowering.lower_forward(STEP0, ROUTE_STEP0))
    assert ops["L01.gpu_experts"].experts == ((2, 3),)
    assert ops["L01.copy.e0"].deps == ("L01.router", "L01.gpu_experts")


def test_lru_fetch_evicts_least_recently_used():
    plan = make_plan("lru-fetch", SPEC, slot_budget=3)
    lowering = Lowering(plan, SPEC)
    lowering.lower_forward(PREFILL, ROUTE_PREFILL)  # loads 0, 1, 2
    lowering.lower_forward(STEP0, routing([[0, 2], [0, 2], [0, 2]]))  # uses 0 and 2: 1 is LRU
    ops = by_id(lowering.lower_forward(STEP1, routing([[3, 0], [3, 0], [3, 0]])))
    assert ops["L01.copy.e3"].evicts == 1


def test_every_step_is_interval_one():
    plan = make_plan("every-step", SPEC, slot_budget=2, first_block_rule="interval")
    assert plan.intervals == (1, 1)
    lowering = Lowering(plan, SPEC)
    lowering.lower_forward(PREFILL, ROUTE_PREFILL)
    lowering.lower_forward(STEP0, ROUTE_STEP0)
    ops = by_id(lowering.lower_forward(STEP1, ROUTE_STEP1))
    # Step 1 refreshes too: top-2 among {2:2, 3:2, 4:2} by id is {2, 3}, already resident.
    assert not any(op.kind == "expert_copy" for op in ops.values())
    four = ForwardInfo(index=3, kind="denoise", block=1, step=2, num_tokens=3, context_tokens=6)
    ops = by_id(lowering.lower_forward(four, routing([[4, 5], [4, 5], [4, 2]])))
    assert ops["L01.copy.e4"].evicts == 3
    assert ops["L01.copy.e5"].evicts == 2


def test_oracle_follows_placements():
    placements = {0: ((0, 2), (4, 5)), 1: ((2, 3), (4, 5))}
    plan = make_plan("oracle", SPEC, slot_budget=2, placements=placements)
    lowering = Lowering(plan, SPEC)
    ops = by_id(lowering.lower_forward(PREFILL, ROUTE_PREFILL))
    assert ops["L01.cpu_experts"].experts == ((1, 2),)
    ops = by_id(lowering.lower_forward(STEP0, ROUTE_STEP0))
    assert ops["L01.copy.e3"].evicts == 0
    assert ops["L01.gpu_experts"].experts == ((2, 3),)


def test_sequential_overlap_chains_ops():
    plan = make_plan("tide", SPEC, slot_budget=2, overlap=Overlap(copies_with_compute=False, cpu_with_gpu=False))
    schedule = Lowering(plan, SPEC).lower_forward(PREFILL, ROUTE_PREFILL)
    schedule.validate()
    ops = by_id(schedule)
    assert "L01.shared_expert" in ops["L01.copy.e0"].deps
    assert "L01.gpu_expert.e0" in ops["L01.copy.e1"].deps
    assert "L01.gpu_expert.e1" in ops["L01.act_d2h"].deps
    assert ids(layer_ops(schedule))[-3:] == ["cpu_experts", "act_h2d", "combine"]


def test_op_ids_stable_across_runs():
    plan = make_plan("tide", SPEC, slot_budget=2)
    first = Lowering(plan, SPEC).lower_forward(PREFILL, ROUTE_PREFILL)
    second = Lowering(plan, SPEC).lower_forward(PREFILL, ROUTE_PREFILL)
    assert first == second
