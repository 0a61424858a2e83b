"""How the engine issues ops to its lanes: lane-run records without a timeline, and expert threads."""

from __future__ import annotations

import time

import pytest

from executor.engine import OffloadEngine
from executor.generate import BlockDiffusionConfig, PlainRunner, generate
from executor.lanes import SerialLanes
from executor.session import EMBEDDED_MODEL_DIR, load_model, load_model_spec
from tide.ir import Op
from tide.policies import make_plan

CONFIG = BlockDiffusionConfig(gen_tokens=24, block_length=16, steps=8)
EMBEDDED = load_model_spec(EMBEDDED_MODEL_DIR)
EOS, MASK = EMBEDDED.eos_token_id, EMBEDDED.mask_token_id
PROMPT = list(range(20, 60))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_model(EMBEDDED_MODEL_DIR)


def test_lane_runs_without_op_spans():
    lanes = SerialLanes(op_spans=False)
    lanes.begin_forward()
    ops = [Op("a", "attention", "gpu"), Op("b", "router", "gpu", ("a",)), Op("c", "act_d2h", "d2h", ("b",)),
           Op("d", "cpu_experts", "cpu", ("c",)), Op("e", "combine", "gpu", ("d",))]
    sleeps = {"a": 0.004, "b": 0.004, "c": 0.0, "d": 0.006, "e": 0.002}
    for op in ops:
        lanes.run(op, time.sleep, sleeps[op.id])
    records = lanes.finish_forward()
    # One record per run of ops on the same lane, under the run's first op. The records tile the pass.
    assert [op.id for op, _, _ in records] == ["a", "c", "d", "e"]
    for (_, _, end), (_, start, _) in zip(records, records[1:]):
        assert end == start
    assert records[0][2] - records[0][1] >= sleeps["a"] + sleeps["b"]
    assert records[2][2] - records[2][1] >= sleeps["d"]


def test_dependency_check_without_op_spans():
    lanes = SerialLanes(op_spans=False)
    lanes.begin_forward()
    lanes.run(Op("a", "embed", "gpu"), lambda: None)
    with pytest.raises(RuntimeError, match="before its dependency"):
        lanes.run(Op("c", "head", "gpu", ("b",)), lambda: None)


def test_counters_without_timeline(model):
    """Without a timeline the engine keeps the same counters and busy lanes, and no spans."""
    plan = make_plan("tide", EMBEDDED, slot_budget=4, interval=2)
    results = []
    for record_timeline in (True, False):
        with OffloadEngine(model, plan, EMBEDDED, record_timeline=record_timeline) as engine:
            output = generate(engine, PROMPT, CONFIG, mask_token_id=MASK, eos_token_id=EOS)
        results.append((engine, output))
    (with_timeline, output), (without, other_output) = results
    assert other_output.token_ids == output.token_ids
    assert without.counters == with_timeline.counters
    assert with_timeline.spans
    assert not without.spans
    busy_lanes = {lane for lane, seconds in with_timeline.lane_busy_s().items() if seconds > 0}
    assert busy_lanes == {"gpu", "h2d", "d2h", "cpu"}
    assert {lane for lane, seconds in without.lane_busy_s().items() if seconds > 0} == busy_lanes


@pytest.mark.parametrize("serial_lanes", [None, False])
def test_expert_threads_lossless(model, serial_lanes):
    """CPU experts on a pool of two threads give the plain model's tokens."""
    reference = generate(PlainRunner(model), PROMPT, CONFIG, mask_token_id=MASK, eos_token_id=EOS).token_ids
    with OffloadEngine(model, make_plan("cpu-experts", EMBEDDED), EMBEDDED, cpu_threads=2,
                       serial_lanes=serial_lanes) as engine:
        output = generate(engine, PROMPT, CONFIG, mask_token_id=MASK, eos_token_id=EOS)
    assert output.token_ids == reference
    assert engine.counters.misses > 0
