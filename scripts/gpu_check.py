"""GPU check: every policy on a model of the LLaDA2.0-mini shape with random bf16 weights.

The script builds the model straight on the CUDA device, with the routed experts in pinned
host memory. The offloading policies get a memory budget in which half of each layer's
routed experts fit. For each policy it prints tokens/s, hit rate, bytes copied each way,
time on each lane, and whether the greedy tokens equal the all-gpu run's. all-gpu is the
reference and runs with every expert resident, outside that budget.

The weights are random, so the text means nothing; the check is about speed, traffic and
equality. Router biases are drawn wide (``--bias-std``) so that some experts are more
popular than others, as in trained models. CPU expert work runs in bfloat16 on the host
and GPU expert work on the device, so the two may round differently: a token mismatch
on the GPU points to that rounding unless the CPU-device lossless test fails too.

Usage: python scripts/gpu_check.py [--gen-tokens N] [--prompt-tokens N] [--steps N] [--policies a,b,...]
Runs in a few minutes on an H200; needs a CUDA device with about 40 GiB and 40 GiB of host memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_POLICIES = "all-gpu,tide:1,tide:2,tide:4,every-step,static,lru-fetch,cpu-experts"


def build_model(spec, device: torch.device, seed: int, bias_std: float, pin_memory: bool = True):
    """Return an llada2_moe model of ``spec``'s shape: non-expert weights on ``device``, experts on the host."""
    from executor.model import LLaDA2MoeConfig, LLaDA2MoeForCausalLM

    config = LLaDA2MoeConfig(**spec.config)
    with torch.device("meta"):
        model = LLaDA2MoeForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range

    for name, param in list(model.named_parameters()):
        if ".mlp.experts." in name:
            continue
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, device=device)
        else:
            value = torch.randn(param.shape, generator=generator, device=device) * std
        # The router stays in float32, as the checkpoint loader keeps it.
        value = value.to(torch.float32 if ".mlp.gate." in name else torch.bfloat16)
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    for block in model.moe_blocks():
        block.gate._buffers["expert_bias"] = torch.randn(config.num_experts, generator=generator,
                                                         device=device) * bias_std
        packed_size = 3 * config.moe_intermediate_size * config.hidden_size
        packed = torch.empty(config.num_experts, packed_size, dtype=torch.bfloat16, pin_memory=pin_memory)
        for start in range(0, config.num_experts, 32):
            chunk = torch.randn(min(32, config.num_experts - start), packed_size, generator=generator, device=device)
            packed[start:start + len(chunk)].copy_((chunk * std).to(torch.bfloat16))
        block.pack_experts(packed=packed)
    return model.eval()


def parse_policies(text: str) -> list[tuple[str, int]]:
    policies = []
    for item in text.split(","):
        name, _, interval = item.strip().partition(":")
        policies.append((name, int(interval) if interval else 2))
    return policies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="llada2-mini", help="shipped spec whose shape to build (default llada2-mini)")
    parser.add_argument("--prompts", type=int, default=1, help="random prompts (default 1)")
    parser.add_argument("--prompt-tokens", type=int, default=96, help="tokens per prompt (default 96)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="passes per block (default 8)")
    parser.add_argument("--slot-fraction", type=float, default=0.5,
                        help="share of each layer's experts that the budget fits (default 0.5)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma-separated policies, tide with ':τ' (default {DEFAULT_POLICIES})")
    parser.add_argument("--cpu-threads", type=int, default=1, help="threads for CPU expert work (default 1)")
    parser.add_argument("--bias-std", type=float, default=0.2, help="std of the random router biases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available; this check needs one (the CPU-device tests cover the "
              "rest: pytest tests/test_lossless.py)", file=sys.stderr)
        return 2

    from executor.engine import OffloadEngine
    from executor.generate import BlockDiffusionConfig, generate
    from executor.records import build_trace
    from executor.session import RunOptions, choose_slots, context_sizes
    from tide.memory import plan_memory
    from tide.policies import make_plan
    from tide.spec import load_spec
    from tide.units import format_bytes

    device = torch.device("cuda", torch.cuda.current_device())
    spec = load_spec(args.spec)
    config = BlockDiffusionConfig(gen_tokens=args.gen_tokens, block_length=args.block_length, steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    special = {spec.mask_token_id, spec.eos_token_id}
    prompts = []
    for _ in range(args.prompts):
        ids = torch.randint(0, spec.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
        prompts.append([i if i not in special else 0 for i in ids])

    # A memory budget in which the wanted share of experts fits, checked like `tide generate --gpu-memory`.
    max_context, batch_tokens = context_sizes([len(p) for p in prompts], config)
    wanted = int(spec.num_experts * args.slot_fraction)
    fixed = plan_memory(spec, torch.cuda.get_device_properties(device).total_memory,
                        max_context_tokens=max_context, batch_tokens=batch_tokens)
    pool = wanted * spec.num_moe_layers * fixed.expert_bytes
    budget = int((fixed.non_expert_bytes + fixed.kv_cache_bytes + fixed.activation_bytes + pool) / 0.95) + 1
    slots, memory = choose_slots(spec, RunOptions(policy="tide", gpu_memory_bytes=budget), device, max_context,
                                 batch_tokens)
    print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}, model shape '{spec.name}' "
          f"({spec.total_params / 1e9:.1f}B parameters, bf16, random weights)")
    print(f"budget {format_bytes(budget)} for offloading policies: {slots[0]} of {spec.num_experts} experts per MoE "
          f"layer ({spec.num_moe_layers} layers, {format_bytes(memory.expert_bytes)} per expert); all-gpu keeps all")
    print(f"{args.prompts} random prompt(s) of {args.prompt_tokens} tokens, {args.gen_tokens} generated, block "
          f"{args.block_length}, {args.steps} steps, threshold {config.threshold}, greedy, CPU threads "
          f"{args.cpu_threads}")

    start = time.perf_counter()
    model = build_model(spec, device, args.seed, args.bias_std)
    torch.cuda.synchronize(device)
    print(f"built the model in {time.perf_counter() - start:.1f} s")

    def run(plan):
        engine = OffloadEngine(model, plan, spec, device=device, cpu_threads=args.cpu_threads,
                               record_timeline=False)
        try:
            torch.cuda.synchronize(device)
            began = time.perf_counter()
            outputs = [generate(engine, ids, config, mask_token_id=spec.mask_token_id, eos_token_id=None,
                                sequence=i) for i, ids in enumerate(prompts)]
            torch.cuda.synchronize(device)
            return engine, outputs, time.perf_counter() - began
        finally:
            engine.close()

    # Warm-up: CUDA context, kernels and the pinned allocator.
    warm = BlockDiffusionConfig(gen_tokens=args.block_length, block_length=args.block_length, steps=2)
    with OffloadEngine(model, make_plan("tide", spec, slot_budget=list(slots)), spec, device=device) as engine:
        generate(engine, prompts[0][:args.block_length], warm, mask_token_id=spec.mask_token_id, eos_token_id=None)

    header = (f"{'policy':<12} {'slots':>5} {'tokens/s':>9} {'hit rate':>8} {'h2d GB':>8} {'d2h GB':>8} "
              f"{'gpu s':>7} {'h2d s':>7} {'cpu s':>7}  same tokens as all-gpu")
    print("\n" + header + "\n" + "-" * len(header))
    reference = None
    profile = None
    for name, interval in parse_policies(args.policies):
        if name == "all-gpu":
            plan = make_plan("all-gpu", spec)
        elif name == "static":
            if profile is None:
                print(f"{'static':<12} skipped: needs the all-gpu run first, for its profiling trace")
                continue
            plan = make_plan("static", spec, slot_budget=list(slots), profiling_trace=profile)
        else:
            plan = make_plan(name, spec, slot_budget=list(slots), interval=interval)
        engine, outputs, elapsed = run(plan)
        tokens = [o.token_ids for o in outputs]
        if name == "all-gpu":
            reference = tokens
            profile = build_trace(engine, spec, config, [str(i) for i in range(len(prompts))])
            same = "reference"
        elif reference is None:
            same = "no all-gpu run to compare with"
        else:
            equal = sum(a == b for ref, out in zip(reference, tokens) for a, b in zip(ref, out))
            total = sum(len(ref) for ref in reference)
            same = "yes" if tokens == reference else f"NO ({equal}/{total} positions equal)"
        counters, busy = engine.counters, engine.lane_busy_s()
        count = sum(len(t) for t in tokens)
        label = f"{name} τ={interval}" if name == "tide" else name
        print(f"{label:<12} {plan.slot_budgets[0]:>5} {count / elapsed:>9.1f} {counters.hit_rate:>8.3f} "
              f"{counters.h2d_bytes / 1e9:>8.2f} {counters.d2h_bytes / 1e9:>8.3f} {busy['gpu']:>7.2f} "
              f"{busy['h2d']:>7.2f} {busy['cpu']:>7.2f}  {same}", flush=True)
        del engine
        torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - start:.0f} s; master copies pinned: {torch.empty(1).pin_memory().is_pinned()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
