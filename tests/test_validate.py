"""The validator: error maths on hand-built timelines, serial lanes, and the known-bad cases.

The known-bad cases hold real executor runs against profiles that are wrong on purpose
(copies twice as fast, the CPU half as fast) and against schedules with an op missing or
added. The validator must fail each of them, while the right profile passes.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from tide.errors import InputError
from tide.ir import ForwardInfo, Op, Schedule, Span, Timeline, load_timeline
from tide.validate import (ErrorStats, Thresholds, check_comparison, check_ranking, compare_timelines,
                           composite_timeline, relative_error)
from validation_helpers import gate_run, perturb_profile, write_copy_heavy_model

MS = 1e-3


def timeline(source: str, passes: list[list[tuple[str, str, str, float]]], *, gap_s: float = 0.0) -> Timeline:
    """Build a timeline from passes of (op id, kind, lane, duration in ms), each pass's ops back to back."""
    spans, forwards = [], []
    clock = 0.0
    for index, ops in enumerate(passes):
        forwards.append(ForwardInfo(index=index, kind="denoise", block=0, step=index, num_tokens=4,
                                    context_tokens=4, committed_tokens=1))
        for op_id, kind, lane, duration_ms in ops:
            spans.append(Span(index, op_id, kind, lane, clock, clock + duration_ms * MS))
            clock += duration_ms * MS
        clock += gap_s
    return Timeline(source=source, spans=tuple(spans), forwards=tuple(forwards))


PASS_OPS = [("embed", "embed", "gpu"), ("L00.attention", "attention", "gpu"), ("L00.cpu_experts", "cpu_experts", "cpu"),
            ("head", "head", "gpu")]


def passes(*durations_ms: tuple[float, ...]) -> list[list[tuple[str, str, str, float]]]:
    return [[(*op, d) for op, d in zip(PASS_OPS, pass_durations)] for pass_durations in durations_ms]


# ----------------------------------------------------------------------------------------
# Error maths


def test_relative_error_signs():
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    assert relative_error(0.9, 1.0) == pytest.approx(-0.1)
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1.0, 0.0) == math.inf


def test_error_stats_exact():
    stats = ErrorStats.of([0.1, -0.2, 0.05, -0.05, 0.3])
    assert stats.count == 5
    assert stats.mean_abs == pytest.approx(0.14)
    assert stats.mean_signed == pytest.approx(0.04)
    assert stats.p50 == pytest.approx(0.1)
    # numpy's linear interpolation between the 4th (0.2) and 5th (0.3) of the sorted |errors|.
    assert stats.p90 == pytest.approx(0.26)
    assert stats.max == pytest.approx(0.3)


def test_compare_timelines_exact():
    measured = timeline("measured", passes((1, 4, 3, 2), (1, 2, 5, 2)), gap_s=0.5)
    predicted = timeline("simulated", passes((1, 5, 3, 2), (1, 2, 4, 1)))
    comparison = compare_timelines(measured, predicted)
    assert comparison.schedules_match
    assert comparison.matched == 8
    # Pass times leave out the gap between passes: 10 and 10 ms measured, 11 and 8 predicted.
    assert comparison.measured_s == pytest.approx(20 * MS)
    assert comparison.predicted_s == pytest.approx(19 * MS)
    assert comparison.e2e_error == pytest.approx(-0.05)
    assert [step.error for step in comparison.steps] == pytest.approx([0.1, -0.2])
    assert comparison.step_stats.mean_signed == pytest.approx(-0.05)
    assert comparison.by_kind["attention"].measured_s == pytest.approx(6 * MS)
    assert comparison.by_kind["attention"].predicted_s == pytest.approx(7 * MS)
    assert comparison.by_kind["cpu_experts"].error == pytest.approx(-1 / 8)
    assert comparison.by_lane["gpu"].count == 6
    assert comparison.by_lane["gpu"].error == pytest.approx((12 - 12) / 12)
    assert comparison.by_lane["cpu"].error == pytest.approx(-1 / 8)


def test_compare_timelines_reports_missing_and_added_ops():
    measured = timeline("measured", passes((1, 4, 3, 2)))
    extra = Span(0, "L00.copy.e3", "expert_copy", "h2d", 0.0, 1 * MS)
    predicted = Timeline("simulated", measured.spans[:2] + measured.spans[3:] + (extra,), measured.forwards)
    comparison = compare_timelines(measured, predicted)
    assert comparison.only_measured == ("0:L00.cpu_experts",)
    assert comparison.only_predicted == ("0:L00.copy.e3",)
    assert not comparison.schedules_match
    failures = check_comparison(comparison, Thresholds(max_e2e_error=10.0, max_step_p90_error=10.0))
    assert len(failures) == 1
    assert "schedules differ" in failures[0]
    assert "L00.cpu_experts" in failures[0]
    assert "L00.copy.e3" in failures[0]


def test_check_comparison_thresholds():
    measured = timeline("measured", passes((1, 4, 3, 2), (1, 4, 3, 2)))
    predicted = timeline("simulated", passes((1, 4, 3, 2.6), (1, 4, 3, 2)))  # +6% on one pass, +3% end to end
    comparison = compare_timelines(measured, predicted)
    assert comparison.e2e_error == pytest.approx(0.03)
    assert check_comparison(comparison, Thresholds(max_e2e_error=0.05, max_step_p90_error=0.06)) == []
    e2e_only = check_comparison(comparison, Thresholds(max_e2e_error=0.02, max_step_p90_error=0.06))
    assert len(e2e_only) == 1
    assert "end-to-end" in e2e_only[0]
    step_only = check_comparison(comparison, Thresholds(max_e2e_error=0.05, max_step_p90_error=0.05))
    assert len(step_only) == 1
    assert "p90" in step_only[0]


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "5%"])
def test_thresholds_reject_bad_values(value):
    with pytest.raises(InputError, match="max_e2e_error"):
        Thresholds(max_e2e_error=value)


def test_composite_takes_fastest_repeat_of_each_pass():
    first = timeline("measured", passes((1, 4, 3, 2), (1, 2, 5, 2)), gap_s=0.3)  # passes of 10 and 10 ms
    second = timeline("measured", passes((1, 3, 3, 2), (1, 4, 5, 2)))  # passes of 9 and 12 ms
    composite = composite_timeline([first, second])
    assert composite.forward_times_s() == pytest.approx({0: 9 * MS, 1: 10 * MS})
    # Passes are laid end to end from 0, each from its repeat.
    assert composite.spans[0].start_s == 0.0
    assert composite.spans[4].start_s == pytest.approx(9 * MS)
    assert [s.duration_s for s in composite.spans] == pytest.approx([x * MS for x in (1, 3, 3, 2, 1, 2, 5, 2)])
    assert composite.metadata["repeats"] == 2


def test_composite_rejects_repeats_with_other_ops():
    first = timeline("measured", passes((1, 4, 3, 2)))
    other = Timeline("measured", first.spans[:3] + (Span(0, "tail", "head", "gpu", 0.0, 1.0),), first.forwards)
    with pytest.raises(ValueError, match="other ops"):
        composite_timeline([first, other])
    with pytest.raises(ValueError, match="no timelines"):
        composite_timeline([])


def test_ranking_ties_agreements_and_disagreements():
    measured = {"a": 100.0, "b": 101.0, "c": 110.0, "d": 90.0}
    predicted = {"a": 103.0, "b": 100.0, "c": 112.0, "d": 95.0}
    check = check_ranking(measured, predicted, tie_tolerance=0.02)
    verdicts = {(p.first, p.second): p.verdict for p in check.pairs}
    assert verdicts[("a", "b")] == "tie"  # 1% apart measured, so the reversed prediction is fine
    assert verdicts[("a", "c")] == "agree"
    assert verdicts[("c", "d")] == "agree"
    assert check.passed
    assert check.measured_order == ("c", "b", "a", "d")
    assert check.predicted_order == ("c", "a", "b", "d")

    reversed_c = check_ranking(measured, {**predicted, "c": 99.0}, tie_tolerance=0.02)
    assert not reversed_c.passed
    assert {(p.first, p.second) for p in reversed_c.disagreements} == {("b", "c"), ("a", "c")}


def test_ranking_tolerance_grows_with_noise():
    measured = {"a": 100.0, "b": 105.0}
    predicted = {"a": 106.0, "b": 100.0}
    assert not check_ranking(measured, predicted).passed
    # Repeats that scatter by about 10% make a 5% gap noise.
    noisy = check_ranking(measured, predicted, {"a": [90.0, 100.0, 110.0], "b": [95.0, 105.0, 115.0]})
    assert noisy.passed
    assert noisy.pairs[0].tolerance == pytest.approx(2 * math.hypot(10 / 100 / math.sqrt(3), 10 / 105 / math.sqrt(3)))


# ----------------------------------------------------------------------------------------
# Shared cores in the simulator and serial lanes in the executor


class RoundCosts:
    def __init__(self, by_kind_us: dict[str, int]) -> None:
        self.by_kind_us = by_kind_us

    def duration_s(self, op: Op) -> float:
        return self.by_kind_us[op.kind] * 1e-6


def test_shared_cores_runs_ops_in_schedule_order():
    from sim import simulate_schedules
    from tide.ir import OP_LANES

    def op(op_id, kind, deps=()):
        return Op(op_id, kind, OP_LANES[kind], tuple(deps), 1)

    ops = (op("L01.router", "router"), op("L01.act_d2h", "act_d2h", ["L01.router"]),
           op("L01.cpu_experts", "cpu_experts", ["L01.act_d2h"]), op("L01.shared_expert", "shared_expert", ["L01.router"]),
           op("L01.act_h2d", "act_h2d", ["L01.cpu_experts"]),
           op("L01.combine", "combine", ["L01.shared_expert", "L01.act_h2d"]))
    schedule = Schedule(ForwardInfo(index=0, kind="denoise", num_tokens=1, context_tokens=1), ops)
    costs = RoundCosts({"router": 10, "act_d2h": 2, "cpu_experts": 30, "shared_expert": 20, "act_h2d": 3, "combine": 5})
    overlapped = simulate_schedules([schedule], costs)
    serial = simulate_schedules([schedule], costs, shared_cores=True)

    def times(result):
        return {s.op_id: (round(s.start_s * 1e6), round(s.end_s * 1e6)) for s in result.timeline.spans}

    # With lanes of their own, the shared expert runs beside the CPU path.
    assert times(overlapped)["L01.shared_expert"] == (10, 30)
    assert overlapped.total_ns == 50_000
    # With shared cores every op waits for the one before it in schedule order.
    assert times(serial) == {"L01.router": (0, 10), "L01.act_d2h": (10, 12), "L01.cpu_experts": (12, 42),
                             "L01.shared_expert": (42, 62), "L01.act_h2d": (62, 65), "L01.combine": (65, 70)}
    assert serial.total_ns == 70_000
    assert serial.critical_path_s["cpu"] == pytest.approx(30e-6)


def test_serial_lanes_tile_each_pass():
    from executor.lanes import SerialLanes

    lanes = SerialLanes()
    lanes.begin_forward()
    first, second = Op("a", "embed", "gpu"), Op("b", "head", "gpu", ("a",))
    lanes.run(first, lambda: None)
    time.sleep(0.01)  # engine work between two ops belongs to the first
    lanes.run(second, lambda: None)
    (_, a_start, a_end), (_, b_start, b_end) = lanes.finish_forward()
    assert a_end == b_start
    assert a_end - a_start >= 0.01
    assert b_end >= b_start


def test_serial_lanes_cpu_clock_leaves_out_waiting():
    from executor.lanes import SerialLanes

    for cpu_clock, slept in ((True, False), (False, True)):
        lanes = SerialLanes(cpu_clock=cpu_clock)
        lanes.begin_forward()
        lanes.run(Op("a", "embed", "gpu"), lambda: time.sleep(0.05))
        ((_, start, end),) = lanes.finish_forward()
        assert (end - start >= 0.05) == slept


def test_serial_lanes_reject_op_before_its_dependency():
    from executor.lanes import SerialLanes

    lanes = SerialLanes()
    lanes.begin_forward()
    with pytest.raises(RuntimeError, match="dependency"):
        lanes.run(Op("b", "head", "gpu", ("a",)), lambda: None)


# ----------------------------------------------------------------------------------------
# Known-bad cases on real runs


@pytest.mark.slow
def test_right_profile_passes_on_policies_that_use_cpu():
    result = gate_run()
    for policy in ("tide", "cpu-experts"):
        assert result.policies[policy].failures == []


@pytest.mark.slow
def test_cpu_half_as_fast_fails():
    from tide.validate import resimulate

    result = gate_run()
    wrong = resimulate(result, perturb_profile(result.profile, cpu_speed=0.5))
    cpu_experts = wrong.policies["cpu-experts"]
    assert cpu_experts.comparison.e2e_error > 0.1
    assert any("end-to-end" in f for f in cpu_experts.failures)
    # Only the CPU lane moved.
    before = result.policies["cpu-experts"].comparison
    after = cpu_experts.comparison
    assert after.by_lane["gpu"].predicted_s == pytest.approx(before.by_lane["gpu"].predicted_s)
    assert after.by_lane["cpu"].predicted_s > 1.5 * before.by_lane["cpu"].predicted_s
    assert not wrong.passed


@pytest.mark.slow
def test_measured_op_missing_or_added_fails():
    from tide.validate import check_comparison

    result = gate_run()
    policy = result.policies["tide"]
    measured, predicted = policy.measured, policy.predicted
    copies = [s for s in measured.spans if s.kind == "expert_copy"]
    assert copies, "the tide run should copy experts"

    missing = Timeline("measured", tuple(s for s in measured.spans if s is not copies[0]), measured.forwards)
    failures = check_comparison(compare_timelines(missing, predicted), result.settings.thresholds)
    assert any("schedules differ" in f and copies[0].op_id in f for f in failures)

    extra = Span(copies[0].forward, "L01.copy.e999", "expert_copy", "h2d", copies[0].start_s, copies[0].end_s, 1)
    added = Timeline("measured", measured.spans + (extra,), measured.forwards)
    failures = check_comparison(compare_timelines(added, predicted), result.settings.thresholds)
    assert any("schedules differ" in f and "L01.copy.e999" in f for f in failures)


@pytest.mark.slow
def test_simulated_plan_other_than_executed_fails():
    import dataclasses

    from sim import simulate
    from tide.validate import check_comparison

    result = gate_run()
    policy = result.policies["tide"]
    # The simulator replays the run with a refresh every step instead of every second step.
    other_plan = dataclasses.replace(policy.plan, intervals=(1,) * policy.plan.num_moe_layers)
    predicted = simulate(result.spec, result.profile, other_plan, policy.trace, record_timeline=True).timeline
    failures = check_comparison(compare_timelines(policy.measured, predicted), result.settings.thresholds)
    assert any("schedules differ" in f for f in failures)


@pytest.mark.slow
def test_copies_twice_as_fast_fails(tmp_path_factory):
    import torch

    from tide.calibrate import CalibrationSession, CalibrationSettings
    from tide.validate import ValidationSettings, resimulate, run_validation

    model = str(write_copy_heavy_model(tmp_path_factory.mktemp("copy-heavy")))
    settings = CalibrationSettings(token_points=(1, 8, 32, 64), context_points=(32, 64, 128),
                                   copy_expert_counts=(1, 2, 4), link_sizes_bytes=(1 << 20, 8 << 20), warmup=2,
                                   repeats=5, engine_gen_tokens=32, engine_repeats=3)
    threads = torch.get_num_threads()
    try:
        session = CalibrationSession(model=model, settings=settings)
        result = run_validation(None, ValidationSettings(model=model, policies=("lru-fetch",), slots=2, repeats=3),
                                calibration=session)
    finally:
        torch.set_num_threads(threads)

    right = result.policies["lru-fetch"]
    share = right.comparison.by_lane["h2d"].measured_s / right.comparison.measured_s
    assert share > 0.12, f"copies take only {share:.1%} of the run, too little to show a wrong copy bandwidth"

    wrong = resimulate(result, perturb_profile(result.profile, copy_bandwidth=2.0)).policies["lru-fetch"]
    assert wrong.comparison.by_kind["expert_copy"].error < right.comparison.by_kind["expert_copy"].error - 0.3
    assert any("end-to-end" in f for f in wrong.failures)
    # The wrong bandwidth alone moves the error by more than the threshold.
    assert wrong.comparison.e2e_error < right.comparison.e2e_error - result.settings.thresholds.max_e2e_error


# ----------------------------------------------------------------------------------------
# Report and CLI


@pytest.mark.slow
def test_report_directory(tmp_path):
    from tide.validate import write_report

    result = gate_run()
    written = write_report(result, tmp_path / "report", profile=result.profile)
    names = {path.name for path in written}
    assert {"report.json", "report.html", "profile.json", "tide.measured.json", "tide.predicted.json"} <= names
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] == result.passed
    assert set(report["policies"]) == set(result.policies)
    assert len(report["policies"]["tide"]["steps"]) == result.policies["tide"].comparison.step_stats.count
    measured = load_timeline(str(tmp_path / "report" / "tide.measured.json"))
    predicted = load_timeline(str(tmp_path / "report" / "tide.predicted.json"))
    assert {s.key for s in measured.spans} == {s.key for s in predicted.spans}
    page = (tmp_path / "report" / "report.html").read_text()
    assert "measured above predicted" in page
    assert "per pass" in page


def test_cli_validate_rejects_bad_input(capsys, tmp_path):
    from tide.cli.main import main

    assert main(["validate", "--profile", str(tmp_path / "missing.json"), "--policy", "oracle"]) == 2
    assert "--policy" in capsys.readouterr().err
    assert main(["validate", "--profile", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["validate", "--calibrate", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
