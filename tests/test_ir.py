import json

import pytest

from tide.errors import InputError
from tide.ir import (ForwardInfo, Op, Plan, Schedule, Span, Timeline, load_plan, load_timeline, save_plan,
                     save_timeline)
from tide.policies import make_plan

from helpers import small_spec


def test_plan_json_round_trip(tmp_path):
    plan = make_plan("oracle", small_spec(), slot_budget=2, placements={0: ((0, 1), (2, 3))},
                     provenance={"planner": "test"})
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan


@pytest.mark.parametrize("change,field", [
    ({"policy": "fastest"}, "policy"),
    ({"intervals": [0, 1]}, "intervals[0]"),
    ({"miss_service": ["cpu", "disk"]}, "miss_service[1]"),
    ({"slot_budgets": [2]}, "intervals"),
    ({"schema_version": 99}, "schema_version"),
])
def test_plan_rejects_bad_fields(change, field):
    data = {**make_plan("tide", small_spec(), slot_budget=2).to_json(), **change}
    with pytest.raises(InputError) as caught:
        Plan.from_json(data, source="plan.json")
    assert f"'{field}'" in str(caught.value)
    assert "plan.json" in str(caught.value)


def test_missing_plan_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_plan(tmp_path / "nope.json")


def test_schedule_validate_catches_forward_dep():
    forward = ForwardInfo(index=0, kind="prefill", num_tokens=1, context_tokens=1)
    bad = Schedule(forward, (Op("a", "embed", "gpu", ("b",)), Op("b", "head", "gpu")))
    with pytest.raises(ValueError, match="not an earlier op"):
        bad.validate()
    wrong_lane = Schedule(forward, (Op("a", "expert_copy", "gpu"),))
    with pytest.raises(ValueError, match="lane"):
        wrong_lane.validate()


def test_schedule_json_round_trip():
    forward = ForwardInfo(index=3, kind="denoise", block=0, step=1, num_tokens=2, context_tokens=4)
    schedule = Schedule(forward, (Op("embed", "embed", "gpu"),
                                  Op("L01.copy.e4", "expert_copy", "h2d", ("embed",), 1, bytes=10.0, slot=0,
                                     evicts=2, experts=((4, 1),))))
    assert Schedule.from_json(json.loads(json.dumps(schedule.to_json()))) == schedule


def test_timeline_chrome_trace_and_reload(tmp_path):
    spans = (Span(0, "embed", "embed", "gpu", 0.0, 1e-3), Span(0, "L01.copy.e1", "expert_copy", "h2d", 1e-3, 3e-3, 1),
             Span(0, "L01.cpu_experts", "cpu_experts", "cpu", 1e-3, 2e-3, 1))
    timeline = Timeline("simulated", spans, metadata={"policy": "tide"})
    chrome = timeline.to_chrome_trace()
    complete = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert [e["ts"] for e in complete] == [0.0, 1000.0, 1000.0]
    assert complete[1]["dur"] == pytest.approx(2000.0)
    assert len({e["pid"] for e in complete}) == 2  # accelerator and host
    assert len({e["tid"] for e in complete}) == 3
    save_timeline(timeline, tmp_path / "t.json")
    assert load_timeline(tmp_path / "t.json") == timeline
    assert timeline.busy_s()["h2d"] == pytest.approx(2e-3)
    assert timeline.makespan_s == pytest.approx(3e-3)
