"""The cost model: hand-computed durations on a profile with round numbers."""

from __future__ import annotations

import pytest

from tide.costs import CostModel
from tide.errors import InputError
from tide.hardware import CalibrationTable, CpuSpec, GpuSpec, HardwareProfile, HostLink, Provenance, load_profile
from tide.ir import OP_LANES, Op

GPU_OVERHEAD = 2e-5
CPU_OVERHEAD = 5e-5


def _profile(tables=None) -> HardwareProfile:
    """A profile with round figures: the GPU reaches 1e14 FLOP/s and 1e12 bytes/s after
    efficiency, the CPU 1e12 FLOP/s and 1e11 bytes/s, the link 1e10 bytes/s pinned."""
    return HardwareProfile(
        name="round",
        gpu=GpuSpec(name="round GPU", memory_bytes=1e10, bf16_dense_flops=2e14, bf16_accumulate="fp32",
                    hbm_bytes_per_s=2e12),
        link=HostLink(name="round link", h2d_pinned_bytes_per_s=1e10, d2h_pinned_bytes_per_s=5e9,
                      h2d_pageable_bytes_per_s=2.5e9, d2h_pageable_bytes_per_s=2e9, latency_s=1e-5,
                      datasheet_bytes_per_s=1.6e10),
        cpu=CpuSpec(name="round CPU", cores=10, expert_flops=2e12, memory_bytes_per_s=2e11, memory_bytes=1e11),
        provenance=Provenance(kind="calibrated" if tables else "datasheet", source="test",
                              calibrated_at="2025-01-01T00:00:00Z" if tables else None),
        efficiency={"gemm_flops": 0.5, "hbm": 0.5, "cpu_flops": 0.5, "cpu_memory": 0.5},
        op_overhead_s={"gpu": GPU_OVERHEAD, "h2d": 0.0, "d2h": 0.0, "cpu": CPU_OVERHEAD},
        tables=tables or {},
    )


def _op(kind: str, **fields) -> Op:
    return Op(id=f"test.{kind}", kind=kind, lane=OP_LANES[kind], **fields)


def test_copy_is_latency_plus_bytes_over_bandwidth():
    model = CostModel(_profile())
    assert model.duration_s(_op("expert_copy", bytes=1e9)) == pytest.approx(0.10001, rel=1e-12)
    assert model.duration_s(_op("act_h2d", bytes=1e6)) == pytest.approx(1e-5 + 1e-4, rel=1e-12)
    # Device to host has its own bandwidth: 5e9 bytes/s.
    assert model.duration_s(_op("act_d2h", bytes=1e6)) == pytest.approx(1e-5 + 2e-4, rel=1e-12)


def test_pageable_copies_use_pageable_bandwidth():
    model = CostModel(_profile(), pinned=False)
    assert model.duration_s(_op("expert_copy", bytes=1e9)) == pytest.approx(1e-5 + 0.4, rel=1e-12)
    assert model.duration_s(_op("act_d2h", bytes=1e6)) == pytest.approx(1e-5 + 5e-4, rel=1e-12)


def test_gpu_op_compute_bound():
    # 1e12 FLOP at 1e14 FLOP/s = 10 ms; 1e6 bytes at 1e12 bytes/s = 1 us.
    op = _op("attention", tokens=32, context=512, flops=1e12, bytes=1e6)
    assert CostModel(_profile()).duration_s(op) == pytest.approx(GPU_OVERHEAD + 1e-2, rel=1e-12)


def test_gpu_op_memory_bound():
    # 1e8 FLOP at 1e14 FLOP/s = 1 us; 1e9 bytes at 1e12 bytes/s = 1 ms.
    op = _op("gpu_experts", tokens=32, flops=1e8, bytes=1e9, experts=((0, 16), (1, 16)))
    assert CostModel(_profile()).duration_s(op) == pytest.approx(GPU_OVERHEAD + 1e-3, rel=1e-12)


def test_cpu_experts_sum_per_expert():
    # Totals: 1.4e9 FLOP over 14 tokens (1e8 FLOP per token, 1e-4 s per token at 1e12 FLOP/s)
    # and 6e7 bytes over 3 experts (2e7 bytes each, 2e-4 s at 1e11 bytes/s).
    # Expert 5 (1 token): max(1e-4, 2e-4); expert 9 (3 tokens): max(3e-4, 2e-4);
    # expert 12 (10 tokens): max(1e-3, 2e-4). One roofline over the totals would give 1.4e-3.
    op = _op("cpu_experts", tokens=14, flops=1.4e9, bytes=6e7, experts=((5, 1), (9, 3), (12, 10)))
    expected = CPU_OVERHEAD + 2e-4 + 3e-4 + 1e-3
    assert CostModel(_profile()).duration_s(op) == pytest.approx(expected, rel=1e-12)


def test_cpu_experts_memory_bound_each():
    # Eight experts with one token each: every expert reads its 1e7 bytes once (1e-4 s),
    # which takes longer than its 1e7 FLOP (1e-5 s).
    op = _op("cpu_experts", tokens=8, flops=8e7, bytes=8e7, experts=tuple((e, 1) for e in range(8)))
    assert CostModel(_profile()).duration_s(op) == pytest.approx(CPU_OVERHEAD + 8 * 1e-4, rel=1e-12)


def test_cpu_experts_without_list_use_totals():
    op = _op("cpu_experts", tokens=8, flops=8e7, bytes=8e7)
    assert CostModel(_profile()).duration_s(op) == pytest.approx(CPU_OVERHEAD + 8e-4, rel=1e-12)


def _attention_table() -> dict[str, CalibrationTable]:
    return {"attention": CalibrationTable(x_name="tokens_x_context", x=(1000.0, 2000.0, 4000.0),
                                          seconds=(1e-4, 2e-4, 5e-4))}


def test_table_interpolates_inside_range():
    model = CostModel(_profile(_attention_table()))
    assert model.duration_s(_op("attention", tokens=3, context=500)) == pytest.approx(1.5e-4, rel=1e-12)
    assert model.duration_s(_op("attention", tokens=3, context=1000)) == pytest.approx(3.5e-4, rel=1e-12)
    assert model.duration_s(_op("attention", tokens=2, context=1000)) == pytest.approx(2e-4, rel=1e-12)


def test_table_extrapolates_with_last_slope():
    model = CostModel(_profile(_attention_table()))
    # The last two points rise 3e-4 s over 2000, so 6000 adds another 3e-4 s.
    assert model.duration_s(_op("attention", tokens=6, context=1000)) == pytest.approx(8e-4, rel=1e-12)
    assert model.duration_s(_op("attention", tokens=40, context=1000)) == pytest.approx(5e-4 + 36000 * 1.5e-7,
                                                                                        rel=1e-12)


def test_table_below_smallest_point_meets_overhead():
    model = CostModel(_profile(_attention_table()))
    # Halfway between (0, 2e-5) and (1000, 1e-4).
    assert model.duration_s(_op("attention", tokens=1, context=500)) == pytest.approx(6e-5, rel=1e-12)
    assert model.duration_s(_op("attention", tokens=0, context=500)) == pytest.approx(GPU_OVERHEAD, rel=1e-12)


def test_table_replaces_roofline_only_for_its_kind():
    model = CostModel(_profile(_attention_table()))
    op = _op("attention", tokens=3, context=500, flops=1e12, bytes=1e6)
    assert model.duration_s(op) == pytest.approx(1.5e-4, rel=1e-12)
    assert model.duration_s(_op("router", tokens=32, flops=1e12)) == pytest.approx(GPU_OVERHEAD + 1e-2, rel=1e-12)


def test_expert_table_sums_lookups_per_expert():
    table = CalibrationTable(x_name="tokens_per_expert", x=(1.0, 2.0, 4.0), seconds=(1.5e-4, 2e-4, 3e-4))
    model = CostModel(_profile({"cpu_experts": table}))
    # Per expert beyond the 5e-5 overhead: 1 token 1e-4, 3 tokens 2e-4, 6 tokens 3.5e-4.
    op = _op("cpu_experts", tokens=10, experts=((0, 1), (1, 3), (2, 6)))
    assert model.duration_s(op) == pytest.approx(CPU_OVERHEAD + 1e-4 + 2e-4 + 3.5e-4, rel=1e-12)
    single = _op("cpu_experts", tokens=2, experts=((7, 2),))
    assert model.duration_s(single) == pytest.approx(2e-4, rel=1e-12)


def test_copy_table_uses_bytes():
    table = CalibrationTable(x_name="bytes", x=(1e6, 1e7), seconds=(1.1e-4, 1.01e-3))
    model = CostModel(_profile({"expert_copy": table}))
    assert model.duration_s(_op("expert_copy", bytes=5.5e6)) == pytest.approx(5.6e-4, rel=1e-12)
    # Below the first point, towards the 1e-5 s link latency at zero bytes.
    assert model.duration_s(_op("expert_copy", bytes=5e5)) == pytest.approx(6e-5, rel=1e-12)


def test_lane_of_follows_kind():
    model = CostModel(_profile())
    assert model.lane_of(_op("expert_copy")) == "h2d"
    assert model.lane_of(_op("act_d2h")) == "d2h"
    assert model.lane_of(_op("cpu_experts")) == "cpu"
    assert model.lane_of(_op("combine")) == "gpu"


def test_unknown_kind_rejected():
    model = CostModel(_profile())
    op = Op(id="L01.mystery", kind="mystery", lane="gpu")
    with pytest.raises(InputError, match="mystery"):
        model.duration_s(op)
    with pytest.raises(InputError, match="mystery"):
        model.lane_of(op)


def test_shared_cores_reported():
    assert CostModel(load_profile("cpu-host")).shared_cores is True
    assert CostModel(load_profile("h200")).shared_cores is False


def test_shipped_profile_durations_are_positive():
    model = CostModel(load_profile("h200"))
    for kind in OP_LANES:
        op = _op(kind, tokens=32, context=64, flops=1e9, bytes=1e7, experts=((0, 4), (1, 28)))
        assert model.duration_s(op) > 0
