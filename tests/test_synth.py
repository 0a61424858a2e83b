"""Synthetic traces: the trace format, reproducibility, and knobs that move the statistics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import small_spec
from tide.errors import InputError
from tide.spec import load_spec
from tide.synth import SYNTH_DEFAULTS, synthesize_trace
from tide.trace import load_trace, save_trace
from tide.trace_stats import compute_stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return load_spec("tiny")


def test_forward_passes_follow_generation(tiny):
    trace = synthesize_trace(tiny, gen_tokens=96, prompt_tokens=20, seed=1)
    forwards = trace.forwards
    assert forwards[0].kind == "prefill"
    assert (forwards[0].num_tokens, forwards[0].context_tokens) == (20, 20)
    position = 1
    for block in range(3):
        steps = []
        while forwards[position].kind == "denoise":
            steps.append(forwards[position])
            position += 1
        assert [f.step for f in steps] == list(range(len(steps)))
        assert {f.block for f in steps} == {block}
        assert sum(f.committed_tokens for f in steps) == 32
        assert all(f.committed_tokens >= 1 for f in steps)
        assert all((f.num_tokens, f.context_tokens) == (32, 20 + 32 * (block + 1)) for f in steps)
        cache_write = forwards[position]
        assert (cache_write.kind, cache_write.block, cache_write.num_tokens) == ("cache_write", block, 32)
        position += 1
    assert position == len(forwards)
    assert [f.index for f in forwards] == list(range(len(forwards)))
    assert trace.metadata.source == "synthetic"
    assert trace.metadata.generation.gen_tokens == 96


def test_trace_saved_and_loaded(tiny, tmp_path):
    trace = synthesize_trace(tiny, gen_tokens=64, seed=2)
    path = tmp_path / "tiny.trace"
    save_trace(trace, path)
    loaded = load_trace(path)  # checks every id range, count and the checksum
    assert loaded.equals(trace)
    experts = loaded.experts
    assert experts.shape == (sum(f.num_tokens for f in trace.forwards), tiny.num_moe_layers, tiny.top_k)
    ordered = np.sort(experts, axis=2)
    assert not (ordered[:, :, 1:] == ordered[:, :, :-1]).any()


def test_same_seed_same_bytes(tmp_path):
    # Another process too, because a library's hash order could differ between processes.
    command = [sys.executable, "-m", "tide.cli.main", "trace", "synth", "--model", "tiny", "--gen-tokens", "64",
               "--seed", "7"]
    first, second = tmp_path / "a.trace", tmp_path / "b.trace"
    subprocess.run(command + ["--out", str(first)], check=True, cwd=ROOT, capture_output=True)
    save_trace(synthesize_trace(load_spec("tiny"), gen_tokens=64, seed=7), second)
    assert first.read_bytes() == second.read_bytes()


def test_other_seed_other_routing(tiny):
    a = synthesize_trace(tiny, gen_tokens=64, seed=1)
    b = synthesize_trace(tiny, gen_tokens=64, seed=2)
    assert not np.array_equal(a.experts[:100], b.experts[:100])


def test_skew_concentrates_routing():
    mini = load_spec("llada2-mini")
    flat = compute_stats(synthesize_trace(mini, gen_tokens=64, seed=0, skew=0.0))
    skewed = compute_stats(synthesize_trace(mini, gen_tokens=64, seed=0, skew=2.0))
    assert skewed.distinct_experts_per_forward < flat.distinct_experts_per_forward - 50


def test_persistence_keeps_experts(tiny):
    loose = compute_stats(synthesize_trace(tiny, gen_tokens=128, seed=0, persistence=0.3))
    tight = compute_stats(synthesize_trace(tiny, gen_tokens=128, seed=0, persistence=0.95))
    assert tight.adjacent_step_cosine > loose.adjacent_step_cosine
    assert tight.adjacent_step_overlap > loose.adjacent_step_overlap


def test_full_persistence_repeats_routing(tiny):
    trace = synthesize_trace(tiny, gen_tokens=32, seed=0, persistence=1.0)
    steps = [i for i, f in enumerate(trace.forwards) if f.kind == "denoise"]
    for index in steps[1:]:
        assert np.array_equal(trace.routing(index), trace.routing(steps[0]))


def test_zero_persistence_replaces_every_expert(tiny):
    trace = synthesize_trace(tiny, gen_tokens=32, seed=0, persistence=0.0)
    steps = [i for i, f in enumerate(trace.forwards) if f.kind == "denoise"]
    for before, after in zip(steps, steps[1:]):
        previous, current = trace.routing(before), trace.routing(after)
        shared = (previous[:, :, :, None] == current[:, :, None, :]).any(axis=(2, 3))
        assert not shared.any()


@pytest.mark.parametrize("tokens_per_forward", [1.5, 3.19, 8.0])
def test_tokens_per_forward_knob(tiny, tokens_per_forward):
    trace = synthesize_trace(tiny, gen_tokens=320, seed=0, tokens_per_forward=tokens_per_forward)
    denoise = sum(f.kind == "denoise" for f in trace.forwards)
    assert denoise == round(320 / tokens_per_forward)
    assert compute_stats(trace).tokens_per_forward == pytest.approx(320 / denoise)


def test_steps_cap_each_block(tiny):
    trace = synthesize_trace(tiny, gen_tokens=128, seed=0, steps=8, tokens_per_forward=4.0)
    per_block: dict[int, int] = {}
    for forward in trace.forwards:
        if forward.kind == "denoise":
            per_block[forward.block] = per_block.get(forward.block, 0) + 1
    assert per_block == {0: 8, 1: 8, 2: 8, 3: 8}


def test_without_kv_cache_feeds_whole_sequence(tiny):
    trace = synthesize_trace(tiny, gen_tokens=64, prompt_tokens=10, seed=3, kv_cache=False)
    assert all(f.kind != "cache_write" for f in trace.forwards)
    prompt = trace.routing(0)
    for forward in trace.forwards[1:]:
        assert forward.num_tokens == forward.context_tokens == 10 + 32 * (forward.block + 1)
        # Finished tokens never attend to later ones, so the prompt's routing never changes.
        assert np.array_equal(trace.routing(forward.index)[:10], prompt)
    second_block = [f for f in trace.forwards if f.block == 1]
    first_rows = [trace.routing(f.index)[10:42] for f in second_block]
    assert all(np.array_equal(rows, first_rows[0]) for rows in first_rows)


def test_few_experts_still_distinct():
    spec = small_spec(num_experts=3, num_experts_per_tok=2)
    trace = synthesize_trace(spec, gen_tokens=32, seed=0, persistence=0.2)
    ordered = np.sort(trace.experts, axis=2)
    assert not (ordered[:, :, 1:] == ordered[:, :, :-1]).any()
    assert trace.experts.max() < 3


def test_per_layer_skew(tiny):
    trace = synthesize_trace(tiny, gen_tokens=64, seed=0, skew=[0.0, 0.0, 4.0])
    distinct = compute_stats(trace).distinct_experts_per_layer
    assert distinct[2] < distinct[0]
    assert trace.metadata.extra["synthetic"]["skew"] == [0.0, 0.0, 4.0]


@pytest.mark.parametrize(("arguments", "field"), [
    ({"gen_tokens": 40}, "gen_tokens"),
    ({"gen_tokens": 0}, "gen_tokens"),
    ({"gen_tokens": 64, "prompt_tokens": 0}, "prompt_tokens"),
    ({"gen_tokens": 64, "tokens_per_forward": 40.0}, "tokens_per_forward"),
    ({"gen_tokens": 64, "steps": 4, "tokens_per_forward": 2.0}, "tokens_per_forward"),
    ({"gen_tokens": 64, "persistence": 1.5}, "persistence"),
    ({"gen_tokens": 64, "skew": [1.0, 2.0]}, "skew"),
    ({"gen_tokens": 64, "skew": -1.0}, "skew[0]"),
    ({"gen_tokens": 64, "steps": 0}, "steps"),
    ({"gen_tokens": 64, "seed": -1}, "seed"),
])
def test_bad_arguments_rejected(tiny, arguments, field):
    with pytest.raises(InputError) as error:
        synthesize_trace(tiny, **arguments)
    assert error.value.field == field


def test_mini_defaults_near_published_statistics():
    mini = load_spec("llada2-mini")
    assert SYNTH_DEFAULTS["llada2-mini"].tokens_per_forward == 2.60
    assert SYNTH_DEFAULTS["llada2-flash"].tokens_per_forward == 3.19
    stats = compute_stats(synthesize_trace(mini, gen_tokens=128, seed=0))
    # About 70 distinct experts per 32-token pass and an adjacent-step cosine near 0.985.
    assert 60 <= stats.distinct_experts_per_forward <= 80
    assert 0.975 <= stats.adjacent_step_cosine <= 0.995


def test_draw_follows_weights_of_allowed_experts():
    from tide.synth import _Router

    log_weights = np.stack([-np.log(np.arange(1, 9)), -np.log(np.arange(8, 0, -1))])  # [2 layers, 8 experts]
    router = _Router(np.random.Generator(np.random.PCG64(0)), log_weights, top_k=2, persistence=0.5)
    num_draws = 100_000
    for layer, excluded_experts in ((0, [0, 2]), (1, [7, 3, 7])):
        excluded = np.tile(excluded_experts, (num_draws, 1))
        drawn = router._draw(np.full(num_draws, layer), excluded)
        expected = np.exp(log_weights[layer])
        expected[excluded_experts] = 0.0
        expected /= expected.sum()
        np.testing.assert_allclose(np.bincount(drawn, minlength=8) / num_draws, expected, atol=0.006)
