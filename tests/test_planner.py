"""The planner: vectorised replay against the real policy, optima against brute force, and bad input.

The brute-force tests enumerate every (slot budget, τ) pair of every MoE layer of a tiny
spec, price each combination by lowering the whole trace (``tide.planner.predict``), and
check that the program's choice is as fast as the fastest combination. The round-number
profile prices expert work from calibration tables, on which the planner's per-expert
prices are exact, so optima must agree to rounding.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import numpy as np
import pulp
import pytest

from tide.errors import InputError, SolverError
from tide.hardware import load_profile
from tide.ir import Plan, load_plan
from tide.lowering import lower_trace
from tide.memory import plan_memory
from tide.planner import budget_grid, expert_pool_slots, plan, plan_for_pool, price_candidates
from tide.planner.formulation import CandidateCosts, solve_choice
from tide.planner.predict import predict
from tide.planner.pricing import Pricing
from tide.planner.solvers import check_solver, new_variable, solve
from tide.planner.stats import candidate_intervals, refresh_flags, replay_layer, routing_counts
from tide.policies import make_plan
from tide.spec import load_spec
from tide.trace import TraceMetadata

from planner_cases import random_trace, round_profile, tiny_spec

ROUND = round_profile()


def tide_plan(spec, budgets, intervals, first_block_rule="every-step") -> Plan:
    return Plan(policy="tide", slot_budgets=tuple(budgets), intervals=tuple(intervals),
                miss_service=("cpu",) * len(budgets), first_block_rule=first_block_rule)


def lowered_layer_stats(spec, plan, trace):
    """Per MoE layer: hit assignments, CPU assignments and copies, counted on the lowered ops."""
    stats = defaultdict(lambda: np.zeros(3, dtype=np.int64))
    index_of = {layer: i for i, layer in enumerate(spec.moe_layers)}
    for schedule in lower_trace(plan, spec, trace):
        for op in schedule.ops:
            if op.layer not in index_of:
                continue
            row = stats[index_of[op.layer]]
            if op.kind == "gpu_experts":
                row[0] += op.tokens
            elif op.kind == "cpu_experts":
                row[1] += op.tokens
            elif op.kind == "expert_copy":
                row[2] += 1
    return stats


# --- statistics --------------------------------------------------------------------


def test_routing_counts_match_bincount():
    spec = tiny_spec()
    trace = random_trace(spec, seed=3)
    counts = routing_counts(trace)
    assert counts.shape == (trace.num_forwards, spec.num_moe_layers, spec.num_experts)
    for index in range(trace.num_forwards):
        routing = trace.routing(index)
        for layer in range(spec.num_moe_layers):
            expected = np.bincount(routing[:, layer].ravel().astype(np.int64), minlength=spec.num_experts)
            assert counts[index, layer].tolist() == expected.tolist()


def test_candidate_intervals_drop_repeated_patterns():
    spec = tiny_spec()
    trace = random_trace(spec, num_blocks=3, steps=4)
    # Blocks 1 and 2 have 3 and 4 steps and block 0 refreshes every step, so τ = 4 and
    # τ = 3 refresh at different steps of block 2 only, and τ >= 4 is step 0 alone.
    assert candidate_intervals(trace.forwards) == [1, 2, 3, 4]
    flags = refresh_flags(trace.forwards, 2)
    expected = [f.kind == "prefill" or (f.kind == "denoise" and (f.block == 0 or f.step % 2 == 0))
                for f in trace.forwards]
    assert flags.tolist() == expected


@pytest.mark.parametrize("first_block_rule", ["every-step", "interval"])
@pytest.mark.parametrize("seed", [0, 1])
def test_replay_matches_lowered_policy(seed, first_block_rule):
    spec = tiny_spec(num_experts=6)
    trace = random_trace(spec, seed=seed)
    counts = routing_counts(trace)
    pricing = Pricing(spec, ROUND)
    passes = pricing.pass_costs(trace.forwards)
    budgets = np.arange(spec.num_experts + 1)
    for interval in (1, 2, 3):
        flags = refresh_flags(trace.forwards, interval, first_block_rule)
        replays = [replay_layer(counts[:, layer], flags, budgets, pricing, passes, interval)
                   for layer in range(spec.num_moe_layers)]
        for b, budget in enumerate(budgets):
            plan = tide_plan(spec, [budget] * spec.num_moe_layers, [interval] * spec.num_moe_layers,
                             first_block_rule)
            lowered = lowered_layer_stats(spec, plan, trace)
            for layer, replay in enumerate(replays):
                assert replay.hit_tokens[b] == lowered[layer][0], (interval, budget, layer)
                assert replay.cpu_tokens[b] == lowered[layer][1], (interval, budget, layer)
                assert replay.expert_copies[b] == lowered[layer][2], (interval, budget, layer)


@pytest.mark.parametrize("profile_name", ["h100-pcie", "a100-80g", "round"])
def test_layer_times_match_list_scheduling(profile_name):
    # A wider spec keeps every expert op memory-bound on the roofline profiles, where
    # per-expert prices are exact; the round profile is exact by construction.
    spec = tiny_spec(num_experts=6, hidden_size=1024, moe_intermediate_size=512, num_attention_heads=8,
                     intermediate_size=2048)
    profile = ROUND if profile_name == "round" else load_profile(profile_name)
    trace = random_trace(spec, seed=5, tokens=4)
    counts = routing_counts(trace)
    pricing = Pricing(spec, profile)
    passes = pricing.pass_costs(trace.forwards)
    budgets = np.arange(spec.num_experts + 1)
    for interval in (1, 2, 4):
        flags = refresh_flags(trace.forwards, interval)
        replays = [replay_layer(counts[:, layer], flags, budgets, pricing, passes, interval)
                   for layer in range(spec.num_moe_layers)]
        for b, budget in enumerate(budgets):
            plan = tide_plan(spec, [budget] * spec.num_moe_layers, [interval] * spec.num_moe_layers)
            exact = predict(spec, plan, trace, pricing=pricing)
            fast = passes.outside_moe_s + sum(replay.time_s[:, b] for replay in replays)
            np.testing.assert_allclose(fast, exact.forward_times_s, rtol=1e-9, atol=0)


def test_predict_matches_simulator():
    sim = pytest.importorskip("sim")
    spec = tiny_spec(num_experts=6)
    trace = random_trace(spec, seed=2)
    profile = load_profile("h100-pcie")
    plans = [make_plan("tide", spec, slot_budget=3, interval=2), make_plan("lru-fetch", spec, slot_budget=2),
             make_plan("cpu-experts", spec), make_plan("every-step", spec, slot_budget=4)]
    for chosen in plans:
        simulated = sim.simulate(spec, profile, chosen, trace)
        predicted = predict(spec, chosen, trace, profile=profile)
        # The simulator rounds each op to whole nanoseconds.
        assert predicted.total_s == pytest.approx(simulated.total_s, rel=1e-4), chosen.policy
        assert predicted.hits == simulated.hits
        assert predicted.expert_copies == simulated.expert_copies


# --- the program against brute force ---------------------------------------------


def brute_force_total_s(spec, trace, pool_slots, *, same_interval):
    """Return the fastest total time over every (budget, τ) per layer that fits the pool."""
    pricing = Pricing(spec, ROUND)
    longest = max(f.step for f in trace.forwards if f.kind == "denoise") + 1
    options = [(budget, interval) for budget in range(spec.num_experts + 1) for interval in range(1, longest + 1)]
    best = np.inf
    for combination in itertools.product(options, repeat=spec.num_moe_layers):
        budgets = [budget for budget, _ in combination]
        intervals = [interval for _, interval in combination]
        if sum(budgets) > pool_slots or (same_interval and len(set(intervals)) > 1):
            continue
        best = min(best, predict(spec, tide_plan(spec, budgets, intervals), trace, pricing=pricing).total_s)
    return best


@pytest.mark.parametrize("pool_slots,seed", [(3, 0), (5, 1), (7, 2)])
def test_program_matches_brute_force(pool_slots, seed):
    spec = tiny_spec()
    trace = random_trace(spec, seed=seed)
    result = plan_for_pool(spec, ROUND, trace, pool_slots)
    best = brute_force_total_s(spec, trace, pool_slots, same_interval=False)
    assert sum(result.plan.slot_budgets) <= pool_slots
    assert result.prediction.total_s == pytest.approx(best, rel=1e-9)
    assert result.plan.provenance["program_total_s"] == pytest.approx(best, rel=1e-9)
    assert result.plan.provenance["proven_optimal"] is True


@pytest.mark.parametrize("pool_slots,seed", [(4, 3), (6, 4)])
def test_same_interval_matches_brute_force(pool_slots, seed):
    spec = tiny_spec()
    trace = random_trace(spec, seed=seed)
    result = plan_for_pool(spec, ROUND, trace, pool_slots, same_interval=True)
    best = brute_force_total_s(spec, trace, pool_slots, same_interval=True)
    assert len(set(result.plan.intervals)) == 1
    assert result.prediction.total_s == pytest.approx(best, rel=1e-9)


def test_solve_choice_matches_enumeration():
    rng = np.random.default_rng(7)
    budgets = np.array([0, 2, 3, 5, 8])
    intervals = np.array([1, 2, 4])
    cost = rng.uniform(1.0, 2.0, size=(3, intervals.size, budgets.size))
    candidates = CandidateCosts(budgets, intervals, cost)
    for same_interval in (False, True):
        for pool_slots in (0, 4, 9, 24):
            choice = solve_choice(candidates, pool_slots, same_interval=same_interval)
            best = np.inf
            for picks in itertools.product(itertools.product(range(intervals.size), range(budgets.size)), repeat=3):
                if sum(budgets[b] for _, b in picks) > pool_slots:
                    continue
                if same_interval and len({t for t, _ in picks}) > 1:
                    continue
                best = min(best, sum(cost[layer, t, b] for layer, (t, b) in enumerate(picks)))
            assert choice.objective_s == pytest.approx(best, rel=1e-12), (same_interval, pool_slots)
            assert sum(choice.slot_budgets) <= pool_slots


def test_highs_matches_cbc():
    if not pulp.HiGHS().available():
        pytest.skip("highspy is not installed")
    spec = tiny_spec()
    trace = random_trace(spec, seed=1)
    cbc = plan_for_pool(spec, ROUND, trace, 5, solver="cbc")
    highs = plan_for_pool(spec, ROUND, trace, 5, solver="highs")
    assert highs.prediction.total_s == pytest.approx(cbc.prediction.total_s, rel=1e-9)
    assert highs.plan.provenance["solver"] == "highs"


# --- the whole planner -------------------------------------------------------------


def test_plan_from_memory_budget():
    spec = load_spec("llada2-mini")
    profile = load_profile("h100-pcie")
    trace = _short_synthetic(spec)
    memory = 16 * 2**30
    result = plan(spec, profile, memory, trace)
    chosen = result.plan
    assert chosen.policy == "tide"
    assert len(chosen.slot_budgets) == len(chosen.intervals) == spec.num_moe_layers
    _, pool_slots = expert_pool_slots(spec, profile, memory)
    assert sum(chosen.slot_budgets) <= pool_slots
    assert result.memory.gpu_memory_bytes == memory
    # The prediction comes from lowering the whole trace; the program's sum must agree.
    assert chosen.provenance["program_total_s"] == pytest.approx(result.prediction.total_s, rel=1e-6)
    assert chosen.predicted["tokens_per_s"] == pytest.approx(result.prediction.tokens / result.prediction.total_s)
    uniform = make_plan("tide", spec, slot_budget=pool_slots // spec.num_moe_layers, interval=2)
    assert result.prediction.total_s <= predict(spec, uniform, trace, profile=profile).total_s
    assert set(chosen.predicted["breakdown"]) >= {"expert_copy_s", "cpu_expert_s", "gpu_expert_s", "lane_busy_s"}


def test_plan_with_everything_resident_is_all_gpu():
    spec = tiny_spec()
    trace = random_trace(spec)
    result = plan_for_pool(spec, ROUND, trace, spec.num_moe_layers * spec.num_experts)
    assert result.plan.policy == "all-gpu"
    assert result.choice is None


def test_budget_grid_includes_equal_share():
    grid = budget_grid(256, 2000, 19)
    assert grid[0] == 0
    assert grid[-1] == 256
    assert 2000 // 19 in grid.tolist()
    assert np.all(np.diff(grid) > 0)
    assert budget_grid(6, 4, 2).tolist() == [0, 1, 2, 3, 4]


def test_plan_json_round_trip(tmp_path):
    spec = tiny_spec()
    result = plan_for_pool(spec, ROUND, random_trace(spec), 5)
    path = tmp_path / "plan.json"
    from tide.ir import save_plan

    save_plan(result.plan, str(path))
    loaded = load_plan(str(path))
    assert loaded.slot_budgets == result.plan.slot_budgets
    assert loaded.intervals == result.plan.intervals
    assert loaded.predicted["tokens_per_s"] == pytest.approx(result.prediction.tokens_per_s)
    assert json.loads(path.read_text())["provenance"]["solver"] == "cbc"


# --- bad input and solver failures ----------------------------------------------


def test_memory_too_small_for_one_expert():
    spec = load_spec("llada2-mini")
    profile = load_profile("h100-pcie")
    fixed = plan_memory(spec, 16 * 2**30)
    # The pool is what the budget leaves after the fixed parts and a 5% reserve; aim it at half an expert.
    wanted = fixed.non_expert_bytes + fixed.kv_cache_bytes + fixed.activation_bytes + spec.expert_bytes() // 2
    memory = int(wanted / 0.95) + 1
    assert 0 <= plan_memory(spec, memory).expert_pool_bytes < spec.expert_bytes()
    with pytest.raises(InputError, match="less than one expert") as raised:
        plan(spec, profile, memory)
    assert raised.value.field == "gpu_memory"


def test_memory_below_non_expert_weights():
    spec = load_spec("llada2-mini")
    with pytest.raises(InputError, match="cannot hold the non-expert weights") as raised:
        plan(spec, load_profile("h100-pcie"), 2 * 2**30)
    assert raised.value.field == "gpu_memory"


def test_memory_above_device():
    spec = load_spec("llada2-mini")
    with pytest.raises(InputError, match="larger than the device"):
        plan(spec, load_profile("rtx4090"), 40 * 2**30)


@pytest.mark.parametrize("field,value", [("num_experts", 8), ("num_moe_layers", 3), ("top_k", 1)])
def test_trace_of_another_model(field, value):
    spec = tiny_spec()
    trace = random_trace(spec)
    values = {"num_moe_layers": trace.metadata.num_moe_layers, "num_experts": trace.metadata.num_experts,
              "top_k": trace.metadata.top_k, field: value}
    other = TraceMetadata(spec_name="other", spec_hash="x", **values)
    wrong = type(trace)(other, trace.forwards, trace.experts)
    with pytest.raises(InputError, match=field) as raised:
        plan_for_pool(spec, ROUND, wrong, 4)
    assert raised.value.field == field


def test_shared_cores_profile_not_planned():
    spec = tiny_spec()
    with pytest.raises(NotImplementedError, match="share cores"):
        plan_for_pool(spec, load_profile("cpu-host"), random_trace(spec), 4)


def test_unknown_and_missing_solvers(monkeypatch):
    with pytest.raises(InputError, match="unknown solver"):
        check_solver("gurobi")
    monkeypatch.setattr(pulp.HiGHS, "available", lambda self: False)
    with pytest.raises(InputError, match="not installed") as raised:
        check_solver("highs")
    assert raised.value.field == "solver"


def test_time_limit_reached_is_an_error():
    # A zero time limit stops CBC before it finds any solution.
    spec = tiny_spec(num_experts=64)
    trace = random_trace(spec, seed=4, tokens=8)
    with pytest.raises(SolverError, match="time limit"):
        plan_for_pool(spec, ROUND, trace, 40, time_limit_s=0)


def test_failing_solver_is_an_error(monkeypatch):
    def broken(self, solver=None, **options):
        raise pulp.PulpSolverError("solver binary crashed")

    monkeypatch.setattr(pulp.LpProblem, "solve", broken)
    spec = tiny_spec()
    with pytest.raises(SolverError, match="solver cbc failed: solver binary crashed"):
        plan_for_pool(spec, ROUND, random_trace(spec), 4)


def test_infeasible_program_is_an_error():
    problem = pulp.LpProblem("infeasible", pulp.LpMinimize)
    x = new_variable(problem, "x", 0, 1, pulp.LpBinary)
    problem += x
    problem += x >= 2
    with pytest.raises(SolverError, match="infeasible"):
        solve(problem, "cbc", 10, what="toy program")


def _short_synthetic(spec):
    from tide.synth import synthesize_trace

    return synthesize_trace(spec, gen_tokens=64, seed=1)


def test_shared_replay_matches_separate():
    spec = tiny_spec(num_experts=6)
    trace = random_trace(spec, seed=11, num_blocks=4)
    pricing = Pricing(spec, ROUND)
    passes = pricing.pass_costs(trace.forwards)
    counts = routing_counts(trace)
    budgets = np.arange(spec.num_experts + 1)
    candidates = price_candidates(spec, trace, pricing, budgets)
    for layer in range(spec.num_moe_layers):
        for t, interval in enumerate(candidates.intervals):
            flags = refresh_flags(trace.forwards, int(interval))
            separate = replay_layer(counts[:, layer], flags, budgets, pricing, passes, int(interval))
            np.testing.assert_allclose(candidates.cost_s[layer, t], separate.time_s.sum(axis=0), rtol=1e-12)


def test_price_candidates_shape():
    spec = tiny_spec()
    trace = random_trace(spec)
    pricing = Pricing(spec, ROUND)
    budgets = np.arange(3)
    candidates = price_candidates(spec, trace, pricing, budgets)
    assert candidates.cost_s.shape == (spec.num_moe_layers, len(candidates.intervals), 3)
    # With no slots every pass runs every routed expert on the CPU, whatever τ is.
    assert np.ptp(candidates.cost_s[:, :, 0], axis=1).max() == 0.0


# --- the command line ------------------------------------------------------------


def _write_cli_inputs(tmp_path, slots: float):
    """Write the tiny spec, the round profile and a trace, and size a GPU budget for ``slots`` expert slots."""
    from tide.hardware import save_profile
    from tide.trace import save_trace

    from planner_cases import TINY_CONFIG

    model = tmp_path / "config.json"
    model.write_text(json.dumps(TINY_CONFIG))
    spec = load_spec(str(model))
    hardware = tmp_path / "round.json"
    save_profile(ROUND, hardware)
    trace_path = tmp_path / "tiny.trace"
    trace = random_trace(spec, seed=12)
    save_trace(trace, trace_path)
    fixed = plan_memory(spec, 2**20)
    # The pool is what the budget leaves after the fixed parts and a 5% reserve.
    wanted = fixed.non_expert_bytes + fixed.kv_cache_bytes + fixed.activation_bytes + slots * spec.expert_bytes()
    return str(model), str(hardware), str(trace_path), int(wanted / 0.95) + 1


def test_plan_cli_json(tmp_path, capsys):
    from tide.cli.main import main

    model, hardware, trace_path, memory = _write_cli_inputs(tmp_path, slots=5.5)
    out = tmp_path / "plan.json"
    status = main(["plan", "--model", model, "--hardware", hardware, "--gpu-memory", str(memory),
                   "--trace", trace_path, "--out", str(out), "--json", "--oracle", "--oracle-out",
                   str(tmp_path / "oracle.json")])
    assert status == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chosen = printed["plan"]
    assert chosen["policy"] == "tide"
    assert sum(chosen["slot_budgets"]) <= 5
    assert len(chosen["intervals"]) == 2
    assert load_plan(str(out)).slot_budgets == tuple(chosen["slot_budgets"])
    oracle = printed["oracle"]
    assert oracle["bound_s"] <= oracle["tide_copy_cpu_s"]
    assert oracle["gap"] == pytest.approx(oracle["tide_copy_cpu_s"] / oracle["bound_s"] - 1)
    assert load_plan(str(tmp_path / "oracle.json")).policy == "oracle"


def test_plan_cli_rejects_small_memory(tmp_path, capsys):
    from tide.cli.main import main

    model, hardware, trace_path, memory = _write_cli_inputs(tmp_path, slots=0.5)
    status = main(["plan", "--model", model, "--hardware", hardware, "--gpu-memory", str(memory),
                   "--trace", trace_path])
    assert status == 2
    error = capsys.readouterr().err
    assert "less than one expert" in error
    assert "Traceback" not in error
