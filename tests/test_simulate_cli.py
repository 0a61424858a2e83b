"""``tide simulate`` and ``tide trace synth`` as a user runs them."""

from __future__ import annotations

import json

import pytest

from tide.cli.main import main
from tide.ir import load_timeline, save_plan
from tide.policies import make_plan
from tide.spec import load_spec


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "tiny.trace"
    assert main(["trace", "synth", "--model", "tiny", "--gen-tokens", "64", "--prompt-tokens", "16", "--seed", "3",
                 "--out", str(path)]) == 0
    return str(path)


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def run_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_synth_json_describes_trace(capsys, tmp_path):
    path = tmp_path / "t.trace"
    result = run_json(capsys, ["trace", "synth", "--model", "tiny", "--gen-tokens", "96", "--skew", "0.5",
                               "--persistence", "0.9", "--tokens-per-forward", "4", "--out", str(path)])
    assert result["generated_tokens"] == 96
    assert result["forwards_by_kind"] == {"prefill": 1, "denoise": 24, "cache_write": 3}
    assert result["settings"]["persistence"] == 0.9
    assert path.is_file()


def test_simulate_one_policy(capsys, tiny_trace):
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                               "--slots", "6", "--interval", "3"])
    assert result["model"] == "tiny"
    assert result["slots_per_layer"] == 6
    (row,) = result["policies"]
    assert row["policy"] == "tide"
    assert row["relative_to_tide"] == 1.0
    assert row["metadata"]["intervals"] == [3]
    assert row["tokens"] == 64
    assert row["tokens_per_s"] == pytest.approx(64 / row["total_s"])
    assert len(row["forward_times_s"]) == row["num_forwards"]
    assert set(row["lane_busy_fraction"]) == {"gpu", "h2d", "d2h", "cpu"}
    assert row["critical_lane"] in row["lane_busy_fraction"]


def test_simulate_human_output(capsys, tiny_trace):
    assert main(["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                 "--slots", "6"]) == 0
    out = capsys.readouterr().out
    for label in ("throughput", "per forward", "per block", "hit rate", "copied", "lanes busy", "critical lane"):
        assert label in out


def test_policy_all_table(capsys, tiny_trace):
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                               "--slots", "6", "--policy", "all"])
    rows = {row["policy"]: row for row in result["policies"]}
    # Every expert of the tiny model fits in 1 GiB, so all-gpu runs. The oracle needs a plan.
    assert set(rows) == {"tide", "every-step", "static", "lru-fetch", "cpu-experts", "all-gpu"}
    assert "oracle" in result["skipped"]
    assert rows["tide"]["relative_to_tide"] == 1.0
    for row in rows.values():
        assert row["relative_to_tide"] == pytest.approx(row["tokens_per_s"] / rows["tide"]["tokens_per_s"])
    assert rows["all-gpu"]["hit_rate"] == 1.0

    assert main(["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                 "--slots", "6", "--policy", "all"]) == 0
    out = capsys.readouterr().out
    assert "vs tide" in out
    assert "oracle: skipped" in out


def test_all_gpu_skipped_when_memory_short(capsys, tiny_trace):
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                               "--slots", "6", "--policy", "all"])
    assert "all-gpu" in {row["policy"] for row in result["policies"]}
    # --slots does not change what fits, so the memory budget alone decides; a tight one skips all-gpu.
    spec = load_spec("tiny")
    tight = spec.non_expert_bytes() + 3 * 2**20
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory",
                               str(tight), "--policy", "all"])
    assert "all-gpu" in result["skipped"]
    assert "all 16 experts" in result["skipped"]["all-gpu"]


def test_timeline_and_html_written(capsys, tiny_trace, tmp_path):
    timeline, html = tmp_path / "run.json", tmp_path / "run.html"
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                               "--slots", "6", "--timeline-out", str(timeline), "--html", str(html)])
    loaded = load_timeline(str(timeline))
    assert loaded.source == "simulated"
    assert len(loaded.spans) == result["policies"][0]["num_ops"]
    chrome = json.loads(timeline.read_text())
    assert {e["args"]["name"] for e in chrome["traceEvents"] if e["name"] == "thread_name"} == {"gpu", "h2d", "d2h",
                                                                                                  "cpu"}
    assert "<html>" in html.read_text()[:100]
    assert result["written"] == [str(timeline), str(html)]


def test_policy_all_writes_one_timeline_per_policy(capsys, tiny_trace, tmp_path):
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                               "--slots", "6", "--policy", "all", "--timeline-out", str(tmp_path / "run.json")])
    for row in result["policies"]:
        assert (tmp_path / f"run.{row['policy']}.json").is_file()


def test_plan_file_simulated(capsys, tiny_trace, tmp_path):
    plan_path = tmp_path / "plan.json"
    save_plan(make_plan("lru-fetch", load_spec("tiny"), slot_budget=5), str(plan_path))
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                               "--plan", str(plan_path)])
    (row,) = result["policies"]
    assert row["policy"] == "lru-fetch"
    assert row["metadata"]["slot_budgets"] == [5]
    err = run_error(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                             "--plan", str(plan_path), "--policy", "all"])
    assert "--policy all" in err


def test_trace_of_other_model_rejected(capsys, tiny_trace, tmp_path):
    out = tmp_path / "t.json"
    err = run_error(capsys, ["simulate", "--trace", tiny_trace, "--model", "llada2-mini", "--hardware", "h100-pcie",
                             "--gpu-memory", "48GiB", "--timeline-out", str(out)])
    assert "num_moe_layers" in err
    assert "llada2-mini" in err
    assert not out.exists()


def test_memory_below_non_expert_weights_rejected(capsys, tiny_trace):
    err = run_error(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "64KiB"])
    assert "--gpu-memory" in err or "gpu_memory" in err
    assert "non-expert weights" in err


def test_unknown_profile_rejected(capsys, tiny_trace):
    err = run_error(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h900", "--gpu-memory", "1GiB"])
    assert "unknown hardware profile" in err
    assert "h100-pcie" in err


def test_shared_cores_profile_serialises(capsys, tiny_trace):
    result = run_json(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "cpu-host", "--gpu-memory", "1GiB",
                               "--slots", "6"])
    (row,) = result["policies"]
    # One op at a time: the lanes' busy fractions add up to the whole run.
    assert sum(row["lane_busy_fraction"].values()) == pytest.approx(1.0)
    assert row["lane_busy_fraction"]["cpu"] > 0


def test_unknown_policy_rejected(capsys, tiny_trace):
    err = run_error(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                             "--policy", "fastest"])
    assert "unknown policy" in err
    assert "every-step" in err


def test_oracle_without_plan_rejected(capsys, tiny_trace):
    err = run_error(capsys, ["simulate", "--trace", tiny_trace, "--hardware", "h100-pcie", "--gpu-memory", "1GiB",
                             "--policy", "oracle"])
    assert "--plan" in err


def test_bad_synth_arguments_rejected(capsys, tmp_path):
    err = run_error(capsys, ["trace", "synth", "--model", "tiny", "--gen-tokens", "50", "--out",
                             str(tmp_path / "t.trace")])
    assert "gen_tokens" in err
    assert "multiple of block_length" in err
