"""Replaying traces: determinism, agreement with the lowering's counts, every policy, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sim import SimResult, simulate
from sim.report import build_figure, write_html
from tide.errors import InputError
from tide.hardware import load_profile
from tide.ir import load_timeline, save_timeline
from tide.lowering import lower_trace, schedule_stats
from tide.policies import make_plan
from tide.spec import load_spec
from tide.synth import synthesize_trace

from helpers import plans_for


@pytest.fixture(scope="module")
def tiny():
    spec = load_spec("tiny")
    trace = synthesize_trace(spec, gen_tokens=64, prompt_tokens=16, seed=5)
    return spec, trace, load_profile("h100-pcie")


def test_replay_same_time_to_the_nanosecond(tiny):
    spec, trace, profile = tiny
    plan = make_plan("tide", spec, slot_budget=6, interval=2)
    first = simulate(spec, profile, plan, trace, record_timeline=True)
    second = simulate(spec, profile, plan, trace, record_timeline=True)
    assert first.total_ns == second.total_ns
    assert first.forward_times_s == second.forward_times_s
    assert first.timeline.spans == second.timeline.spans


def test_replay_counts_match_lowering(tiny):
    spec, trace, profile = tiny
    plan = make_plan("tide", spec, slot_budget=6, interval=2)
    result = simulate(spec, profile, plan, trace)
    totals = {"hits": 0.0, "misses": 0.0, "expert_copies": 0.0, "h2d_bytes": 0.0, "d2h_bytes": 0.0}
    for schedule in lower_trace(plan, spec, trace):
        for key, value in schedule_stats(schedule).items():
            totals[key] += value
    assert result.hits == totals["hits"]
    assert result.misses == totals["misses"]
    assert result.expert_copies == totals["expert_copies"]
    assert result.h2d_bytes == totals["h2d_bytes"]
    assert result.d2h_bytes == totals["d2h_bytes"]
    assert result.hits + result.misses == sum(f.num_tokens for f in trace.forwards) * spec.num_moe_layers * spec.top_k
    assert result.hit_rate == pytest.approx(totals["hits"] / (totals["hits"] + totals["misses"]))
    assert result.tokens == 64
    assert result.tokens_per_s == pytest.approx(64 / result.total_s)


def test_replay_times_add_up(tiny):
    spec, trace, profile = tiny
    plan = make_plan("tide", spec, slot_budget=6, interval=2)
    result = simulate(spec, profile, plan, trace, record_timeline=True)
    assert result.num_forwards == trace.num_forwards
    assert sum(result.forward_times_s) == pytest.approx(result.total_s, rel=1e-12)
    assert len(result.block_times_s) == 2
    assert sum(result.block_times_s) == pytest.approx(result.total_s - result.forward_times_s[0], rel=1e-12)
    assert result.timeline.makespan_s == pytest.approx(result.total_s, rel=1e-12)
    assert sum(result.critical_path_s.values()) == pytest.approx(result.total_s, rel=1e-12)
    for breakdown, elapsed in zip(result.forward_breakdown_s, result.forward_times_s):
        assert sum(breakdown.values()) == pytest.approx(elapsed, rel=1e-9)
    for lane, busy in result.lane_busy_s.items():
        assert busy == pytest.approx(result.timeline.busy_s()[lane], rel=1e-12)
        assert 0.0 <= result.lane_busy_fraction[lane] <= 1.0


def test_every_policy_replays(tiny):
    spec, trace, profile = tiny
    results = {name: simulate(spec, profile, plan, trace) for name, plan in plans_for(spec, trace).items()}
    for name, result in results.items():
        assert result.tokens == 64, name
        assert result.total_s > 0, name
        assert result.metadata["policy"] == name
    assert results["all-gpu"].hit_rate == 1.0
    assert results["all-gpu"].expert_copies == 0
    assert results["cpu-experts"].hit_rate == 0.0
    assert results["cpu-experts"].expert_copies == 0
    assert results["static"].expert_copies == 0
    assert results["lru-fetch"].lane_busy_s["cpu"] == 0.0
    # Every-step refreshes at least as often as τ = 2, so it copies at least as much.
    assert results["every-step"].expert_copies >= results["tide"].expert_copies
    # Nothing beats having every expert on the GPU, and all experts on the CPU is slower.
    fastest = min(results.values(), key=lambda r: r.total_ns)
    assert fastest.metadata["policy"] == "all-gpu"
    assert results["cpu-experts"].total_ns > results["all-gpu"].total_ns


def test_result_json_round_numbers(tiny):
    spec, trace, profile = tiny
    result = simulate(spec, profile, make_plan("tide", spec, slot_budget=6, interval=2), trace)
    data = result.to_json()
    assert isinstance(result, SimResult)
    assert data["total_ns"] == result.total_ns
    assert data["critical_lane"] in ("gpu", "h2d", "d2h", "cpu")
    assert len(data["forward_times_s"]) == trace.num_forwards
    assert "forward_times_s" not in result.to_json(per_forward=False)


def test_timeline_saved_and_reloaded(tiny, tmp_path):
    spec, trace, profile = tiny
    result = simulate(spec, profile, make_plan("tide", spec, slot_budget=6, interval=2), trace, record_timeline=True)
    assert result.timeline.source == "simulated"
    path = tmp_path / "run.json"
    save_timeline(result.timeline, str(path))
    loaded = load_timeline(str(path))
    assert loaded.spans == result.timeline.spans
    chrome = result.timeline.to_chrome_trace()
    complete = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == result.num_ops


def test_html_report_written(tiny, tmp_path):
    spec, trace, profile = tiny
    result = simulate(spec, profile, make_plan("tide", spec, slot_budget=6, interval=2), trace, record_timeline=True)
    figure = build_figure(result, title="tiny")
    gantt_kinds = {t.name for t in figure.data if t.type == "scattergl"}
    assert gantt_kinds == {s.kind for s in result.timeline.spans}
    bars = [t for t in figure.data if t.type == "bar"]
    heights = np.sum([np.array(t.y, dtype=float) for t in bars], axis=0)
    np.testing.assert_allclose(heights, np.array(result.forward_times_s) * 1e3, rtol=1e-9)
    path = tmp_path / "report.html"
    write_html(result, str(path), title="tiny")
    assert "plotly" in path.read_text()[:100000]


def test_report_needs_timeline(tiny):
    spec, trace, profile = tiny
    result = simulate(spec, profile, make_plan("tide", spec, slot_budget=6, interval=2), trace)
    with pytest.raises(ValueError, match="record_timeline"):
        build_figure(result)


def test_trace_of_other_model_rejected(tiny):
    _, trace, profile = tiny
    mini = load_spec("llada2-mini")
    with pytest.raises(InputError, match="num_moe_layers"):
        simulate(mini, profile, make_plan("cpu-experts", mini), trace)


def test_plan_of_other_model_rejected(tiny):
    spec, trace, profile = tiny
    mini = load_spec("llada2-mini")
    with pytest.raises(InputError, match="MoE layers"):
        simulate(spec, profile, make_plan("cpu-experts", mini), trace)


def test_shared_cores_profile_serialises(tiny):
    spec, trace, _ = tiny
    profile = load_profile("cpu-host")
    assert profile.shared_cores
    result = simulate(spec, profile, make_plan("tide", spec, slot_budget=4), trace, record_timeline=True)
    spans = result.timeline.spans
    assert {span.lane for span in spans} >= {"gpu", "cpu"}
    for before, after in zip(spans, spans[1:]):
        assert after.start_s >= before.end_s  # nothing overlaps, and spans follow schedule order
    assert result.total_s == pytest.approx(sum(result.lane_busy_s.values()))


def test_faster_link_shortens_fetch_policy(tiny):
    spec, trace, profile = tiny
    plan = make_plan("lru-fetch", spec, slot_budget=6)
    link = dataclasses.replace(profile.link, h2d_pinned_bytes_per_s=profile.link.h2d_pinned_bytes_per_s / 4)
    slow = dataclasses.replace(profile, link=link)
    assert simulate(spec, slow, plan, trace).total_ns > simulate(spec, profile, plan, trace).total_ns


def test_cached_durations_match_cost_model(tiny):
    from sim.engine import compile_schedules
    from sim.replay import _cached_durations
    from tide.costs import CostModel

    spec, trace, profile = tiny
    plan = make_plan("tide", spec, slot_budget=6, interval=2)
    cost_model = CostModel(profile, dtype_bytes=spec.dtype_bytes)
    schedules = list(lower_trace(plan, spec, trace))
    cached = compile_schedules(schedules, cost_model, duration_function=_cached_durations(cost_model))
    direct = compile_schedules(schedules, cost_model)
    assert cached.duration_ns == direct.duration_ns
