"""``tide generate`` end to end on the embedded model: output, records, memory budget and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tide.cli.main import main
from tide.ir import load_timeline, save_plan
from tide.policies import make_plan
from tide.spec import load_spec
from tide.trace import load_trace

FAST = ["--gen-tokens", "16", "--block-length", "16", "--steps", "4"]
NUM_EXPERTS = load_spec("tiny").num_experts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate_json(capsys, *args: str) -> dict:
    code = main(["generate", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out.strip().splitlines()[-1])


def generate_error(capsys, *args: str) -> str:
    code = main(["generate", *args])
    assert code == 2
    return capsys.readouterr().err


def test_default_model_json(capsys):
    record = generate_json(capsys, "--prompt", "def fibonacci(n):", "--policy", "tide", "--interval", "2", *FAST)
    assert record["model"] == "tiny"
    assert record["policy"] == "tide"
    assert record["slots"] == NUM_EXPERTS // 2
    assert record["device"] == "cpu"
    assert 0 < record["tokens"] <= 16
    assert isinstance(record["text"], str)
    assert 0.0 < record["hit_rate"] < 1.0
    assert record["h2d_bytes"] > 0
    for key in ("tokens_per_s", "tokens_per_forward", "d2h_bytes", "lane_busy_s", "pinned"):
        assert key in record


def test_human_output(capsys):
    assert main(["generate", "--prompt", "hello", "--policy", "cpu-experts", *FAST]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out
    assert "cpu-experts" in out


def test_records_written(capsys, tmp_path):
    trace_path, timeline_path = tmp_path / "run.trace", tmp_path / "run.json"
    record = generate_json(capsys, "--prompt", "abc", "--slots", "4", *FAST, "--trace-out", str(trace_path),
                           "--timeline-out", str(timeline_path))
    trace = load_trace(trace_path)
    assert trace.metadata.spec_name == "tiny"
    assert trace.metadata.spec_hash == load_spec("tiny").config_hash
    assert trace.num_forwards == record["num_forwards"]
    timeline = load_timeline(str(timeline_path))
    assert {s.forward for s in timeline.spans} == set(range(record["num_forwards"]))
    assert json.loads(timeline_path.read_text())["traceEvents"]


def test_replay_counts_returned_tokens(capsys, tmp_path):
    # A short prompt and block 16: the last block is decoded whole, past the 16 tokens returned.
    trace_path = tmp_path / "run.trace"
    record = generate_json(capsys, "--prompt", "abc", "--slots", "4", *FAST, "--trace-out", str(trace_path))
    trace = load_trace(trace_path)
    assert record["committed_tokens"] > record["tokens"]
    assert trace.metadata.extra["output_tokens"] == [record["tokens"]]
    assert trace.output_tokens() == record["tokens"]

    code = main(["simulate", "--trace", str(trace_path), "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                 "--model", "tiny", "--policy", "tide", "--json"])
    assert code == 0
    simulated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policies"][0]
    assert simulated["tokens"] == record["tokens"]


def test_prompts_file(capsys, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"task_id": "A/1", "prompt": "def add(a, b):"}) + "\n" + json.dumps("x = 1") + "\n")
    record = generate_json(capsys, "--prompts", str(path), *FAST)
    assert [o["id"] for o in record["outputs"]] == ["A/1", "1"]
    assert record["num_prompts"] == 2


def test_plan_file(capsys, tmp_path):
    plan = make_plan("tide", load_spec("tiny"), slot_budget=[2, 6, 10], interval=3)
    save_plan(plan, str(tmp_path / "plan.json"))
    record = generate_json(capsys, "--prompt", "abc", "--plan", str(tmp_path / "plan.json"), *FAST)
    assert record["slots"] == [2, 6, 10]
    assert record["intervals"] == [3]


def test_static_policy(capsys):
    record = generate_json(capsys, "--prompt", "abc", "--policy", "static", "--slots", "6", *FAST)
    assert record["policy"] == "static"
    assert record["expert_copies"] == 0  # the hot set is loaded once and never changes


def test_gpu_memory_sets_slots(capsys):
    from tide.memory import plan_memory

    # A 3-token prompt and 16 generated tokens: a 32-position KV cache, 16 tokens per pass.
    expected = plan_memory(load_spec("tiny"), 16 * 2**20, max_context_tokens=32, batch_tokens=16).slots_per_layer
    assert 0 < expected < NUM_EXPERTS
    record = generate_json(capsys, "--prompt", "abc", "--gpu-memory", "16MiB", *FAST)
    assert record["slots"] == expected


def test_budget_too_small_rejected(capsys):
    error = generate_error(capsys, "--prompt", "abc", "--gpu-memory", "1MiB", *FAST)
    assert "gpu_memory" in error
    assert "non-expert weights" in error
    assert "MiB" in error


def test_budget_larger_than_device_rejected(capsys):
    error = generate_error(capsys, "--prompt", "abc", "--gpu-memory", "1000TiB", *FAST)
    assert "larger than the device" in error


def test_all_gpu_without_room_rejected(capsys):
    error = generate_error(capsys, "--prompt", "abc", "--policy", "all-gpu", "--gpu-memory", "16MiB", *FAST)
    assert "all-gpu" in error
    assert f"{NUM_EXPERTS} slots" in error
    assert "accepted: at least" in error


def test_bad_input_rejected(capsys):
    assert "steps" in generate_error(capsys, "--prompt", "abc", "--steps", "40")
    assert "model not found" in generate_error(capsys, "--prompt", "abc", "--model", "/nonexistent/model")
    assert "without weights" in generate_error(capsys, "--prompt", "abc", "--model", "llada2-mini")
    assert "slots" in generate_error(capsys, "--prompt", "abc", "--slots", str(NUM_EXPERTS + 1), *FAST)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in generate_error(capsys, "--prompt", "abc", "--device", "cuda")


def test_model_folder(capsys, tmp_path):
    import shutil

    from executor.session import EMBEDDED_MODEL_DIR

    folder = tmp_path / "my-model"
    shutil.copytree(EMBEDDED_MODEL_DIR, folder)
    record = generate_json(capsys, "--prompt", "abc", "--model", str(folder), *FAST)
    embedded = generate_json(capsys, "--prompt", "abc", *FAST)
    assert record["model"] == "my-model"
    assert record["text"] == embedded["text"]


def test_static_from_profile_trace(capsys, tmp_path):
    trace_path = tmp_path / "profile.trace"
    generate_json(capsys, "--prompt", "def g(x):", "--policy", "all-gpu", *FAST, "--trace-out", str(trace_path))
    record = generate_json(capsys, "--prompt", "abc", "--policy", "static", "--slots", "4",
                           "--profile-trace", str(trace_path), *FAST)
    assert record["policy"] == "static"
    assert record["expert_copies"] == 0


def test_no_kv_cache(capsys):
    cached = generate_json(capsys, "--prompt", "a longer prompt than one block", *FAST)
    uncached = generate_json(capsys, "--prompt", "a longer prompt than one block", "--no-kv-cache", *FAST)
    assert uncached["kv_cache"] is False
    assert uncached["text"] == cached["text"]
    assert uncached["num_forwards"] < cached["num_forwards"]  # no prefill and no cache-write passes
