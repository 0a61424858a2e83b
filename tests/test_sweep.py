"""``tide sweep`` and ``tide.sweep``: the grid, its table and figures, resuming, processes and Ray."""

from __future__ import annotations

import csv
import json

import pytest

from tide.cli.main import main
from tide.errors import InputError, TideError
from tide.sweep import (BASELINES, check_outcome, make_config, point_path, run_sweep, speedup_rows,
                        write_outputs)
from tide.units import parse_size

# The tiny spec needs about 47 MiB for everything but its experts: 50 MiB leaves room for 3
# of its 16 experts per MoE layer, 53 MiB for 7 and 64 MiB for all of them.
MEMORIES = [parse_size("50MiB"), parse_size("53MiB"), parse_size("64MiB")]


def tiny_config(**overrides):
    arguments = {"gen_tokens": 64, "seed": 1}
    arguments.update(overrides)
    return make_config(["tiny"], ["h100-pcie", "rtx4090"], MEMORIES, **arguments)


def comparable(rows):
    """Rows without the wall-clock timings, which differ from run to run."""
    return [{k: v for k, v in row.items() if not k.endswith("_s") or k == "total_s"} for row in rows]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    config = tiny_config()
    outcome = run_sweep(config, out, workers=1)
    return config, outcome, out


def test_grid_has_every_point(local_run):
    config, outcome, out = local_run
    assert len(outcome.rows) == 2 * 3 * 6
    assert (outcome.computed, outcome.reused, outcome.failed) == (36, 0, {})
    assert len(list((out / "points").glob("*.json"))) == 36
    keys = {(row["hardware"], row["gpu_memory_bytes"], row["policy"]) for row in outcome.rows}
    assert len(keys) == 36


def test_points_run_or_say_why(local_run):
    _, outcome, _ = local_run
    by_key = {(row["hardware"], row["gpu_memory_bytes"], row["policy"]): row for row in outcome.rows}
    # all-gpu only fits at 64 MiB; everything else runs everywhere.
    for hardware in ("h100-pcie", "rtx4090"):
        assert by_key[(hardware, MEMORIES[0], "all-gpu")]["status"] == "skipped"
        assert "all-gpu needs all 16 experts" in by_key[(hardware, MEMORIES[0], "all-gpu")]["reason"]
        assert by_key[(hardware, MEMORIES[2], "all-gpu")]["status"] == "ok"
        assert by_key[(hardware, MEMORIES[0], "static")]["slots_per_layer"] == 3
        assert by_key[(hardware, MEMORIES[1], "static")]["slots_per_layer"] == 7
        # With every expert fitting, the planner plans all-gpu, so tide runs as fast as all-gpu.
        tide, all_gpu = by_key[(hardware, MEMORIES[2], "tide")], by_key[(hardware, MEMORIES[2], "all-gpu")]
        assert tide["plan_policy"] == "all-gpu"
        assert tide["tokens_per_s"] == pytest.approx(all_gpu["tokens_per_s"])
    for row in outcome.rows:
        if row["status"] == "ok":
            assert row["tokens"] == 64
            assert row["tokens_per_s"] == pytest.approx(64 / row["total_s"])
            assert 0.0 <= row["hit_rate"] <= 1.0
    assert by_key[("h100-pcie", MEMORIES[0], "cpu-experts")]["hit_rate"] == 0.0


def test_speedups_follow_rows(local_run):
    _, outcome, _ = local_run
    speedups = speedup_rows(outcome.rows)
    assert len(speedups) == 6
    for entry in speedups:
        group = {row["policy"]: row["tokens_per_s"] for row in outcome.rows
                 if (row["hardware"], row["gpu_memory_bytes"]) == (entry["hardware"], entry["gpu_memory_bytes"])
                 and row["status"] == "ok"}
        best = max(BASELINES, key=lambda name: group[name])
        assert entry["best_baseline"] == best
        assert entry["speedup_over_best"] == pytest.approx(group["tide"] / group[best])
        assert entry["speedup_over_cpu-experts"] == pytest.approx(group["tide"] / group["cpu-experts"])
        assert entry["speedup_over_best"] <= min(entry[f"speedup_over_{name}"] for name in BASELINES)


def test_outputs_written(local_run, tmp_path):
    config, outcome, _ = local_run
    written = write_outputs(config, outcome, tmp_path)
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["results.csv", "results.json", "speedup.csv",
                                                              "speedup.html", "throughput.html"]
    with open(tmp_path / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 36
    assert {row["policy"] for row in rows} == {"tide", "every-step", "static", "lru-fetch", "cpu-experts", "all-gpu"}
    document = json.loads((tmp_path / "results.json").read_text())
    assert len(document["points"]) == 36
    assert len(document["speedups"]) == 6
    with open(tmp_path / "speedup.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 6
    throughput = (tmp_path / "throughput.html").read_text()
    assert "Plotly.newPlot" in throughput
    assert "tiny on rtx4090" in throughput
    assert "over best baseline" in (tmp_path / "speedup.html").read_text()


def test_rerun_reuses_points(local_run):
    config, outcome, out = local_run
    again = run_sweep(config, out, workers=1)
    assert (again.computed, again.reused) == (0, 36)
    assert again.rows == outcome.rows


def test_planner_gap_skips_point(tmp_path):
    # The planner does not plan for profiles whose GPU and CPU lanes share cores.
    config = make_config(["tiny"], ["cpu-host"], MEMORIES[1:2], policies=["tide", "static"], gen_tokens=64)
    outcome = run_sweep(config, tmp_path, workers=1)
    tide, static = outcome.rows
    assert tide["status"] == "skipped"
    assert "share cores" in tide["reason"]
    assert static["status"] == "ok"
    assert outcome.failed == {}


def test_interrupted_sweep_resumes(tmp_path):
    config = tiny_config()
    seen = []

    def interrupt_after_five(point, row):
        seen.append(point)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, tmp_path, workers=1, on_point=interrupt_after_five)
    assert len(list((tmp_path / "points").glob("*.json"))) == 5

    resumed = run_sweep(config, tmp_path, workers=1)
    assert (resumed.computed, resumed.reused) == (31, 5)
    assert len(resumed.rows) == 36


def test_changed_settings_recompute(tmp_path):
    small = make_config(["tiny"], ["h100-pcie"], MEMORIES[:1], policies=["tide", "static"], gen_tokens=64)
    run_sweep(small, tmp_path, workers=1)
    other_seed = make_config(["tiny"], ["h100-pcie"], MEMORIES[:1], policies=["tide", "static"], gen_tokens=64,
                             seed=5)
    assert run_sweep(other_seed, tmp_path, workers=1).computed == 2
    # A damaged point file is recomputed, not trusted.
    point = other_seed.points()[0]
    point_path(tmp_path, point).write_text("{not json")
    outcome = run_sweep(other_seed, tmp_path, workers=1)
    assert (outcome.computed, outcome.reused) == (1, 1)


def test_failed_point_reported_and_retried(tmp_path, monkeypatch):
    import tide.sweep

    config = make_config(["tiny"], ["h100-pcie"], MEMORIES[:1], policies=["tide", "static"], gen_tokens=64)
    real_run_point = tide.sweep.run_point

    def failing_static(point, config):
        if point.policy == "static":
            raise RuntimeError("solver crashed")
        return real_run_point(point, config)

    monkeypatch.setattr(tide.sweep, "run_point", failing_static)
    outcome = run_sweep(config, tmp_path, workers=1)
    assert list(outcome.failed) == ["tiny__h100-pcie__50MiB__static"]
    assert "RuntimeError: solver crashed" in outcome.failed["tiny__h100-pcie__50MiB__static"]
    assert [row["policy"] for row in outcome.rows] == ["tide"]
    with pytest.raises(TideError, match="1 sweep points failed"):
        check_outcome(outcome)

    monkeypatch.setattr(tide.sweep, "run_point", real_run_point)
    retried = run_sweep(config, tmp_path, workers=1)
    assert (retried.computed, retried.reused, retried.failed) == (1, 1, {})


def test_worker_processes_match_one_process(local_run, tmp_path):
    config, outcome, _ = local_run
    parallel = run_sweep(config, tmp_path, workers=2)
    assert parallel.computed == 36
    assert comparable(parallel.rows) == comparable(outcome.rows)


@pytest.mark.slow
def test_ray_matches_local(local_run, tmp_path):
    ray = pytest.importorskip("ray")
    config, outcome, _ = local_run
    small = make_config(["tiny"], ["h100-pcie"], MEMORIES[:2], policies=["tide", "static", "cpu-experts"],
                        gen_tokens=64, seed=1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        result = run_sweep(small, tmp_path, use_ray=True)
        assert ray.is_initialized()  # the sweep leaves a Ray instance it did not start running
    finally:
        ray.shutdown()
    assert (result.computed, result.failed) == (6, {})
    local = {row["key"]: row for row in outcome.rows}
    assert comparable(result.rows) == comparable([local[row["key"]] for row in result.rows])


@pytest.mark.parametrize(("arguments", "field"), [
    ({"policies": ["tide", "oracle"]}, "--policies"),
    ({"policies": ["tide", "fastest"]}, "--policies"),
    ({"policies": ["tide", "tide"]}, "--policies"),
    ({"gen_tokens": 0}, "--gen-tokens"),
    ({"profile_trace_path": "profile.trace"}, "--profile-trace"),
    ({"solver": "gurobi"}, "--solver"),
])
def test_bad_grid_rejected(arguments, field):
    with pytest.raises(InputError) as error:
        tiny_config(**arguments)
    assert error.value.field == field


def test_cli_writes_table_and_figures(capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["sweep", "--models", "tiny", "--hardware", "h100-pcie", "--gpu-memory", "50MiB,53MiB",
            "--policies", "tide,static,cpu-experts", "--gen-tokens", "64", "--workers", "1", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["num_points"], result["computed"], result["reused"]) == (6, 6, 0)
    assert len(result["speedups"]) == 2
    assert all((out / name).is_file() for name in ("results.csv", "results.json", "throughput.html",
                                                     "speedup.html"))
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"] == 6


def test_cli_ray_with_workers_rejected(capsys, tmp_path):
    argv = ["sweep", "--models", "tiny", "--hardware", "h100-pcie", "--gpu-memory", "50MiB", "--ray",
            "--workers", "2", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--workers" in capsys.readouterr().err


def test_cli_bad_memory_is_input_error(capsys, tmp_path):
    argv = ["sweep", "--models", "tiny", "--hardware", "h100-pcie", "--gpu-memory", "50MiB,lots", "--out",
            str(tmp_path)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--gpu-memory" in error
    assert "Traceback" not in error
