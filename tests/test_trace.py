import dataclasses

import numpy as np
import pytest

from tide.errors import InputError
from tide.trace import TraceReader, load_trace, save_trace
from tide.trace_stats import compute_stats, interval_hit_rate

from helpers import make_trace, small_spec


def sample_trace():
    spec = small_spec()
    rng = np.random.default_rng(0)
    routings = [np.stack([np.stack([rng.choice(6, 2, replace=False) for _ in range(2)]) for _ in range(n)])
                for n in (5, 3, 3, 3)]
    return make_trace(spec, routings)


def test_round_trip_equal(tmp_path):
    trace = sample_trace()
    path = tmp_path / "t.trace"
    save_trace(trace, path)
    loaded = load_trace(path)
    assert np.array_equal(loaded.experts, trace.experts)
    assert loaded.forwards == trace.forwards
    assert loaded.metadata.spec_hash == trace.metadata.spec_hash
    assert loaded.metadata.created_at != ""


def test_reader_reads_one_forward(tmp_path):
    trace = sample_trace()
    save_trace(trace, tmp_path / "t.trace")
    reader = TraceReader(tmp_path / "t.trace")
    assert np.array_equal(reader.routing(2), trace.routing(2))
    assert len(reader.forwards) == 4


def test_truncated_file_rejected(tmp_path):
    path = tmp_path / "t.trace"
    save_trace(sample_trace(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(InputError):
        load_trace(path)


def test_bit_flip_rejected(tmp_path):
    path = tmp_path / "t.trace"
    save_trace(sample_trace(), path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the expert ids
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        load_trace(path)


def test_out_of_range_expert_names_forward_and_layer(tmp_path):
    trace = sample_trace()
    trace.experts[9, 1, 0] = 6  # forward 1 starts at row 5; row 9 is forward 2, token 1
    with pytest.raises(InputError) as caught:
        save_trace(trace, tmp_path / "t.trace")
        load_trace(tmp_path / "t.trace")
    assert "forward pass 2, MoE layer 1, token 1" in str(caught.value)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_trace(tmp_path / "missing.trace")


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "t.trace"
    save_trace(sample_trace(), path)
    before = path.read_bytes()
    broken = sample_trace()
    object.__setattr__(broken, "experts", broken.experts.astype(np.float64)[:, :, :, None])
    with pytest.raises(Exception):
        save_trace(broken, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]


def test_stats_on_identical_steps():
    spec = small_spec()
    same = np.array([[[0, 1], [2, 3]]] * 2)
    trace = make_trace(spec, [same, same, same, same])
    stats = compute_stats(trace)
    assert stats.adjacent_step_overlap == 1.0
    assert stats.adjacent_step_cosine == pytest.approx(1.0)
    assert stats.distinct_experts_per_forward == 2.0
    assert stats.tokens_per_forward == 1.0


def test_interval_hit_rate_by_hand():
    spec = small_spec()
    # Layer 0 always routes to {0, 1}; layer 1 to {2, 3}. Two slots hold both after the prefill refresh.
    same = np.array([[[0, 1], [2, 3]]] * 2)
    trace = make_trace(spec, [same] * 4)
    # Prefill: 8 assignments all misses (promoted); three denoise passes: 24 hits.
    assert interval_hit_rate(trace, 2, 1) == pytest.approx(24 / 32)
    # One slot: each pass has experts 0 and 1 with 2 tokens each; the refresh keeps the
    # resident one (ties broken by id, so expert 0), which then hits 2 of 4 assignments.
    assert interval_hit_rate(trace, 1, 1) == pytest.approx(12 / 32)


def test_output_tokens_cap_committed():
    spec = small_spec()
    routing = np.zeros((2, spec.num_moe_layers, spec.top_k), dtype=np.int16)
    routing[:, :, 1] = 1
    trace = make_trace(spec, [routing] * 4)  # a prefill, then three passes that commit one token each
    assert sum(f.committed_tokens for f in trace.forwards) == 3
    capped = dataclasses.replace(trace.metadata, generation=dataclasses.replace(trace.metadata.generation,
                                                                                gen_tokens=2))
    assert dataclasses.replace(trace, metadata=capped).output_tokens() == 2
    recorded = dataclasses.replace(trace.metadata, extra={"output_tokens": [1]})
    assert dataclasses.replace(trace, metadata=recorded).output_tokens() == 1
