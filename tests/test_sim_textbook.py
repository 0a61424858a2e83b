"""The engine against the textbook SimPy model (an event per op) on replayed schedules.

The engine's lanes time an op without an event when its dependencies' ends are known
(see ``sim.engine``). These tests replay lowered schedules of every policy, with and
without overlap and with shared cores. Both models must give every op the same start
and end.
"""

import dataclasses

import pytest

from sim.engine import Engine, compile_schedules
from sim.textbook import textbook_times
from tide.costs import CostModel
from tide.hardware import load_profile
from tide.ir import Overlap
from tide.lowering import Lowering
from tide.spec import load_spec
from tide.synth import synthesize_trace

from helpers import plans_for

SPEC = load_spec("tiny")
TRACE = synthesize_trace(SPEC, gen_tokens=64, prompt_tokens=24, seed=5)
PROFILE = load_profile("h100-pcie")

PLANS = plans_for(SPEC, TRACE)


def compiled(plan):
    lowering = Lowering(plan, SPEC)
    initial = {layer: list(lowering.state.layers[i].slots) for i, layer in enumerate(SPEC.moe_layers)}
    schedules = [lowering.lower_forward(forward, routing) for forward, routing in TRACE]
    return compile_schedules(schedules, CostModel(PROFILE, dtype_bytes=SPEC.dtype_bytes), initial_slots=initial)


@pytest.mark.parametrize("overlap", [Overlap(), Overlap(copies_with_compute=False, cpu_with_gpu=False)],
                         ids=["overlap", "sequential"])
@pytest.mark.parametrize("policy", sorted(PLANS))
def test_engine_matches_textbook_times(policy, overlap):
    program = compiled(dataclasses.replace(PLANS[policy], overlap=overlap))
    run = Engine(program).run()
    start, end = textbook_times(program)
    assert len(program.ops) > 100
    assert run.start_ns == start
    assert run.end_ns == end
    assert run.total_ns == max(end)


def test_shared_cores_match_textbook_times():
    program = compiled(PLANS["tide"])
    run = Engine(program, shared_cores=True).run()
    start, end = textbook_times(program, shared_cores=True)
    assert run.start_ns == start
    assert run.end_ns == end
    # With one set of cores nothing overlaps, so the run is the sum of the durations.
    assert run.total_ns == sum(program.duration_ns)


def test_overlap_shortens_the_run():
    program = compiled(PLANS["tide"])
    run = Engine(program).run()
    assert run.total_ns < sum(program.duration_ns)
