"""The offload engine runs exactly the ops that lowering produces, honours their dependencies,
copies the bytes they declare, and records what it did."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from executor.engine import OffloadEngine
from executor.generate import BlockDiffusionConfig, PlainRunner, generate
from executor.records import build_timeline, build_trace, summarize
from executor.session import EMBEDDED_MODEL_DIR, load_model, load_model_spec
from tide.errors import InputError
from tide.ir import load_timeline, save_timeline
from tide.lowering import lower_trace
from tide.policies import make_plan
from tide.spec import load_spec
from tide.trace import load_trace, save_trace

CONFIG = BlockDiffusionConfig(gen_tokens=40, block_length=16, steps=8)
EMBEDDED = load_model_spec(EMBEDDED_MODEL_DIR)
EOS, MASK = EMBEDDED.eos_token_id, EMBEDDED.mask_token_id
PROMPT = list(range(20, 60))  # longer than one block


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_model(EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def spec():
    return load_model_spec(EMBEDDED_MODEL_DIR)


def run_engine(model, spec, plan, **engine_options):
    engine = OffloadEngine(model, plan, spec, keep_schedules=True, **engine_options)
    try:
        output = generate(engine, PROMPT, CONFIG, mask_token_id=MASK, eos_token_id=EOS)
    finally:
        engine.close()
    return engine, output


@pytest.mark.parametrize("policy, options", [
    ("tide", {"slot_budget": 6, "interval": 2}),
    ("lru-fetch", {"slot_budget": 5}),
    ("cpu-experts", {}),
])
def test_runs_the_lowered_schedule(model, spec, policy, options):
    plan = make_plan(policy, spec, **options)
    engine, output = run_engine(model, spec, plan)
    assert engine.forwards == output.forwards

    # Lowering the recorded trace from a fresh policy state, as the simulator does, gives the very ops the engine ran.
    trace = build_trace(engine, spec, CONFIG, ["p0"])
    replayed = list(lower_trace(plan, spec, trace))
    assert len(replayed) == len(engine.schedules)
    for ran, lowered in zip(engine.schedules, replayed):
        assert ran.ops == lowered.ops
        ran.validate()

    # One span per op, with the op's id, kind and lane, in schedule order per forward pass.
    by_forward = {}
    for span in engine.spans:
        by_forward.setdefault(span.forward, []).append(span)
    for schedule in engine.schedules:
        spans = by_forward[schedule.forward.index]
        assert [s.op_id for s in spans] == [op.id for op in schedule.ops]
        assert [(s.kind, s.lane, s.layer) for s in spans] == [(op.kind, op.lane, op.layer) for op in schedule.ops]


def test_dependencies_honoured(model, spec):
    plan = make_plan("tide", spec, slot_budget=4, interval=1)
    engine, _ = run_engine(model, spec, plan)
    spans = {(s.forward, s.op_id): s for s in engine.spans}
    checked = 0
    for schedule in engine.schedules:
        for op in schedule.ops:
            span = spans[(schedule.forward.index, op.id)]
            assert span.end_s >= span.start_s
            for dep in op.deps:
                assert span.start_s >= spans[(schedule.forward.index, dep)].end_s, f"{op.id} began before {dep}"
                checked += 1
    assert checked > 100
    lanes = {s.lane for s in engine.spans}
    assert lanes == {"gpu", "h2d", "d2h", "cpu"}


def test_bytes_copied_match_lowering(model, spec):
    plan = make_plan("every-step", spec, slot_budget=5)
    engine, _ = run_engine(model, spec, plan)
    counters = engine.counters
    assert counters.expert_copies > 0
    # Expert copies and CPU outputs sent back: exactly what the ops declare.
    assert counters.h2d_bytes == counters.lowered_h2d_bytes
    # Hidden states to the host: one row per distinct token with CPU work, which the
    # lowering bounds by min(tokens, CPU assignments).
    hidden_bytes = spec.hidden_size * spec.dtype_bytes
    distinct_rows = 0
    for routing, schedule in zip(engine.routing, engine.schedules):
        for op in schedule.ops:
            if op.kind == "cpu_experts":
                moe_index = spec.moe_layers.index(op.layer)
                cpu_experts = [e for e, _ in op.experts]
                distinct_rows += int(np.isin(routing[:, moe_index, :], cpu_experts).any(axis=1).sum())
    assert counters.d2h_bytes == distinct_rows * hidden_bytes
    assert 0 < counters.d2h_bytes <= counters.lowered_d2h_bytes
    assert counters.hits + counters.misses == sum(len(r) for r in engine.routing) * spec.num_moe_layers * spec.top_k


def test_all_gpu_matches_plain_model_bitwise(model, spec):
    plan = make_plan("all-gpu", spec)
    ids = torch.tensor([PROMPT[:16]])
    positions = torch.arange(16)[None]
    from tide.ir import ForwardInfo

    info = ForwardInfo(0, "denoise", block=0, step=0, num_tokens=16, context_tokens=16)
    with OffloadEngine(model, plan, spec) as engine:
        from_engine = engine.forward(ids, info=info, position_ids=positions)
        engine.end_forward(info)
    plain = PlainRunner(model).forward(ids, info=info, position_ids=positions, attention_mask=None, kv_cache=None,
                                       write_cache=False)
    assert torch.equal(from_engine, plain)


def test_records_round_trip(model, spec, tmp_path):
    plan = make_plan("tide", spec, slot_budget=8, interval=2)
    engine, output = run_engine(model, spec, plan)
    trace = build_trace(engine, spec, CONFIG, ["p0"], extra={"policy": "tide"})
    save_trace(trace, tmp_path / "run.trace")
    loaded = load_trace(tmp_path / "run.trace")
    assert loaded.metadata.source == "executor"
    assert loaded.forwards == trace.forwards
    assert np.array_equal(loaded.experts, trace.experts)
    assert loaded.metadata.generation.block_length == 16
    kinds = [f.kind for f in loaded.forwards]
    assert kinds[0] == "prefill"
    assert "cache_write" in kinds

    timeline = build_timeline(engine, {"policy": "tide"})
    save_timeline(timeline, str(tmp_path / "run.timeline.json"))
    again = load_timeline(str(tmp_path / "run.timeline.json"))
    assert again.source == "measured"
    assert len(again.spans) == sum(len(s.ops) for s in engine.schedules)

    summary = summarize(engine, [output], elapsed_s=2.0)
    assert summary["tokens"] == len(output.token_ids)
    assert summary["tokens_per_s"] == pytest.approx(len(output.token_ids) / 2.0)
    assert summary["hit_rate"] == pytest.approx(engine.counters.hits / (engine.counters.hits
                                                                        + engine.counters.misses))
    assert summary["tokens_per_forward"] == pytest.approx(output.committed_tokens / output.num_denoise_forwards)
    assert set(summary["lane_busy_s"]) == {"gpu", "h2d", "d2h", "cpu"}
    assert summary["lane_busy_s"]["cpu"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works where CUDA is available")
def test_pageable_fallback_recorded(model, spec, caplog):
    plan = make_plan("tide", spec, slot_budget=8, interval=2)
    with caplog.at_level(logging.WARNING, logger="executor.engine"):
        engine = OffloadEngine(model, plan, spec, pin_memory=True)
    engine.close()
    assert engine.pinned is False
    assert "pinning failed" in engine.pinning_note
    assert any("pageable" in record.getMessage() for record in caplog.records)
    assert not engine.master[0].is_pinned()


def test_plan_for_another_model_rejected(model, spec):
    plan = make_plan("tide", load_spec("llada2-mini"), slot_budget=8)
    with pytest.raises(InputError, match="MoE layers"):
        OffloadEngine(model, plan, spec)


def test_batch_of_two_not_implemented(model, spec):
    from tide.ir import ForwardInfo

    with OffloadEngine(model, make_plan("all-gpu", spec), spec) as engine:
        with pytest.raises(NotImplementedError, match="one at a time"):
            engine.forward(torch.zeros(2, 4, dtype=torch.long), info=ForwardInfo(0, "denoise", block=0, step=0,
                                                                                num_tokens=4, context_tokens=4),
                           position_ids=torch.arange(4)[None])


def test_bfloat16_model_lossless():
    # The GPU check's model builder, on the CPU device with the tiny shape: random bf16 weights.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    module_spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gpu_check)
    spec = load_spec("tiny")
    model = gpu_check.build_model(spec, torch.device("cpu"), seed=0, bias_std=0.2, pin_memory=False)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.moe_blocks()[0].gate.weight.dtype == torch.float32

    prompt = list(range(40, 80))
    config = BlockDiffusionConfig(gen_tokens=32, block_length=16, steps=8)
    mask = spec.mask_token_id
    results = {}
    for policy, options in (("all-gpu", {}), ("tide", {"slot_budget": 6, "interval": 2}),
                            ("lru-fetch", {"slot_budget": 6}), ("cpu-experts", {})):
        with OffloadEngine(model, make_plan(policy, spec, **options), spec) as engine:
            output = generate(engine, prompt, config, mask_token_id=mask, eos_token_id=None)
            results[policy] = (output.token_ids, engine.counters.hit_rate)
    reference, _ = results.pop("all-gpu")
    for policy, (tokens, hit_rate) in results.items():
        assert tokens == reference, policy
        assert hit_rate < 1.0
