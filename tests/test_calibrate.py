"""Calibration: the table maths, the profile it builds, a real quick calibration and the CLI."""

from __future__ import annotations

import json

import pytest

from tide.calibrate import (CalibrationSettings, _fixed_cost, build_profile, fit_correction, monotone_points,
                            resolve_device, set_threads)
from tide.costs import CostModel
from tide.errors import InputError
from tide.hardware import TABLE_X_NAMES, HardwareProfile, Provenance, load_profile
from tide.ir import OP_LANES, Op
from tide.spec import load_spec
from validation_helpers import gate_run

US = 1e-6


def test_monotone_points_running_maximum():
    xs, seconds = monotone_points([1, 2, 4, 8], [3.0, 2.0, 5.0, 4.0])
    assert xs == (1.0, 2.0, 4.0, 8.0)
    # A dip is noise; the last point must grow past the one before for extrapolation.
    assert seconds == (3.0, 3.0, 5.0, pytest.approx(5.005))


def test_fixed_cost_from_one_and_k_experts():
    # F = 10 us and 5 us per expert at every size: T1 = 15, T4 = 30.
    assert _fixed_cost([15 * US, 25 * US], [30 * US, 70 * US], 4) == pytest.approx(10 * US)
    # Noise that would make it negative is clamped to 0, and it never exceeds the smallest T1.
    assert _fixed_cost([15 * US], [80 * US], 4) == 0.0
    assert _fixed_cost([15 * US], [1 * US], 4) == pytest.approx(15 * US)
    assert _fixed_cost([15 * US], [30 * US], 1) == 0.0


def test_fit_correction_scale_only():
    predicted = [float(i) for i in range(1, 41)]
    measured = [2.0 * p for p in predicted]
    measured[7] = 1000.0  # a preempted op is trimmed away
    scale, offset = fit_correction(measured, predicted)
    assert scale == pytest.approx(2.0)
    assert offset == 0.0


def test_fit_correction_with_offset():
    predicted = [float(i) for i in range(1, 41)]
    scale, offset = fit_correction([1.5 * p + 10.0 for p in predicted], predicted, offset=True)
    assert scale == pytest.approx(1.5)
    assert offset == pytest.approx(10.0)
    # A negative offset would make small ops cost less than nothing: the scale alone is used.
    scale, offset = fit_correction([1.5 * p - 1.0 for p in predicted], predicted, offset=True)
    assert offset == 0.0
    assert scale == pytest.approx(sum(1.5 * p - 1.0 for p in predicted[2:-2]) / sum(predicted[2:-2]), rel=0.02)
    with pytest.raises(ValueError, match="no ops"):
        fit_correction([], [])


def _synthetic_work(spec) -> dict:
    """Work tables of round numbers: every kind 20 us + 1 us per x unit (per 1000 bytes for copies)."""
    tables = {}
    for kind, x_name in TABLE_X_NAMES.items():
        xs = (1000.0, 2000.0, 4000.0) if x_name == "bytes" else (1.0, 2.0, 4.0)
        per_unit = 1e-3 if x_name == "bytes" else 1.0
        tables[kind] = (xs, tuple((20 + per_unit * x) * US for x in xs))
    return {"tables": tables, "raw": {}, "expert_fixed_s": {"gpu_experts": 5 * US, "cpu_experts": 8 * US},
            "empty_op_s": {"gpu": 1 * US, "h2d": 1 * US, "d2h": 1 * US, "cpu": 1 * US}}


def _build(corrections):
    spec = load_spec("tiny")
    link = {"h2d_pinned_bytes_per_s": 1e10, "d2h_pinned_bytes_per_s": 1e10, "h2d_pageable_bytes_per_s": 1e10,
            "d2h_pageable_bytes_per_s": 1e10, "latency_s": 2 * US}
    provenance = Provenance(kind="calibrated", source="test", calibrated_at="2025-01-01T00:00:00+00:00", threads=1)
    return build_profile("test", device="cpu", work=_synthetic_work(spec), link=link,
                         device_figures={"matmul_flops": 1e11, "memory_bytes_per_s": 2e10}, corrections=corrections,
                         spec=spec, provenance=provenance)


def test_build_profile_applies_corrections_to_whole_ops():
    plain = _build({})
    corrected = _build({"cpu_experts": (2.0, 30 * US), "attention": (1.5, 0.0), "gpu_experts": (3.0, 0.0)})
    assert isinstance(corrected, HardwareProfile)
    assert corrected.shared_cores
    assert corrected.provenance.threads == 1
    plain_model, model = CostModel(plain), CostModel(corrected)

    def op(kind, **values):
        return Op(f"L01.{kind}", kind, OP_LANES[kind], (), 1, **values)

    # An expert op with three experts: overhead + sum(table - overhead), all corrected together.
    cpu = op("cpu_experts", tokens=7, experts=((0, 1), (1, 2), (2, 4)))
    assert plain_model.duration_s(cpu) == pytest.approx((8 + 3 * 12 + 7) * US)
    assert model.duration_s(cpu) == pytest.approx(2.0 * plain_model.duration_s(cpu) + 30 * US)
    gpu = op("gpu_experts", tokens=7, experts=((0, 1), (1, 2), (2, 4)))
    assert model.duration_s(gpu) == pytest.approx(3.0 * plain_model.duration_s(gpu))
    attention = op("attention", tokens=2, context=2)
    assert model.duration_s(attention) == pytest.approx(1.5 * 24 * US)
    # Kinds without a correction keep their work tables.
    head = op("head", tokens=3)
    assert model.duration_s(head) == pytest.approx(plain_model.duration_s(head)) == pytest.approx(23 * US)
    assert corrected.op_overhead_s["cpu"] == pytest.approx(2.0 * 8 * US + 30 * US)


def test_build_profile_lowers_overhead_below_smallest_op():
    profile = _build({"gpu_experts": (10.0, 0.0)})
    # 10 x 5 us would exceed the smallest gpu-lane op (21 us, e.g. embed of one token).
    assert profile.op_overhead_s["gpu"] == pytest.approx(21 * US)
    for kind, table in profile.tables.items():
        assert table.seconds[0] >= profile.fixed_cost_s(kind)


def test_devices_and_threads_checked():
    with pytest.raises(InputError, match="device"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="threads"):
        set_threads(0)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------------------
# A real quick calibration (the CI gate's) and the CLI


@pytest.mark.slow
def test_quick_calibration_of_embedded_model():
    calibration = gate_run().calibration
    profile, measured = calibration.profile, calibration.measurements
    assert set(profile.tables) == set(OP_LANES)
    assert profile.shared_cores
    assert profile.provenance.kind == "calibrated"
    assert profile.provenance.threads == measured["threads"] == 1
    assert "torch" in profile.provenance.library_versions
    assert any(name.startswith("CPU") for name in profile.provenance.device_names)
    assert gate_run().spec.config_hash in profile.provenance.source
    assert measured["elapsed_s"] < 60.0
    for name in ("h2d_pinned_bytes_per_s", "h2d_pageable_bytes_per_s", "d2h_pinned_bytes_per_s",
                 "d2h_pageable_bytes_per_s"):
        assert getattr(profile.link, name) > 1e8
    # Each kind was corrected in place from ops the engine really ran.
    assert set(measured["engine_corrections"]) == set(OP_LANES)
    assert all(count > 10 for count in measured["engine_runs"]["ops"].values())
    assert HardwareProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


TINY_SETTINGS = CalibrationSettings(token_points=(1, 8, 32), context_points=(32, 64), copy_expert_counts=(1, 2),
                                    link_sizes_bytes=(1 << 16, 1 << 20), warmup=1, repeats=3, engine_gen_tokens=8,
                                    engine_repeats=1)


@pytest.mark.slow
def test_cli_calibrate_then_validate(tmp_path, monkeypatch, capsys):
    import torch

    import tide.calibrate
    from tide.cli.main import main

    monkeypatch.setattr(tide.calibrate, "QUICK", TINY_SETTINGS)
    threads = torch.get_num_threads()
    profile_path = tmp_path / "cpu.json"
    try:
        assert main(["calibrate", "--quick", "--out", str(profile_path), "--json"]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["profile"] == str(profile_path)
        assert record["shared_cores"] is True
        profile = load_profile(str(profile_path))
        assert profile.name == record["name"]

        args = ["validate", "--profile", str(profile_path), "--policy", "tide", "--repeats", "1", "--gen-tokens",
                "8", "--report", str(tmp_path / "report"), "--json"]
        assert main(args + ["--max-e2e-error", "10", "--max-step-p90-error", "10"]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert list(record["policies"]) == ["tide"]
        assert record["passed"] is True
        assert (tmp_path / "report" / "report.html").is_file()
        # No prediction is exact, so a zero threshold fails, with exit status 1.
        assert main(args + ["--max-e2e-error", "0"]) == 1
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["passed"] is False
        assert "end-to-end" in record["failures"][0]
    finally:
        torch.set_num_threads(threads)


def test_cli_calibrate_rejects_bad_threads(tmp_path, capsys):
    from tide.cli.main import main

    assert main(["calibrate", "--threads", "0", "--out", str(tmp_path / "p.json")]) == 2
    assert "--threads" in capsys.readouterr().err
