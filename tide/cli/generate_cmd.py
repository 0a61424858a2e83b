"""``tide generate``: generate text by block diffusion with routed experts offloaded to host memory."""

from __future__ import annotations

import logging
import time

from tide.cli.common import add_json_flag, emit, format_table, progress
from tide.errors import InputError
from tide.units import format_bytes, parse_size

logger = logging.getLogger(__name__)

POLICY_CHOICES = ("all-gpu", "tide", "every-step", "static", "lru-fetch", "cpu-experts")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text with experts offloaded to host memory",
        description="Generate text by block diffusion. Every MoE layer keeps a budget of experts (its slots) on "
                    "the accelerator; the policy's schedule decides which, and the output is the same under every "
                    "policy. Without --model, runs the embedded tiny model on the CPU in seconds.")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder in the LLaDA2 layout (default: the embedded 'tiny' model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompts", metavar="FILE.jsonl",
                        help="JSON lines (.jsonl or .jsonl.gz): objects with 'prompt' and an optional 'id' or "
                             "'task_id' (the HumanEval layout), or strings")

    parser.add_argument("--policy", default="tide", choices=POLICY_CHOICES,
                        help="expert placement policy (default: tide). static takes its hot sets from a "
                             "profiling run of the same prompts under tide, or from --profile-trace")
    parser.add_argument("--interval", type=int, default=2, help="refresh interval τ in steps for tide (default: 2)")
    parser.add_argument("--slots", type=int, default=None,
                        help="slots per MoE layer (default: from --gpu-memory, else half of each layer's experts)")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="accelerator memory the run may use, e.g. 24GiB; slots per layer are what fits after "
                             "non-expert weights, KV cache, activations and a 5%% reserve (default: the whole device; "
                             "on the CPU device, the machine's RAM)")
    parser.add_argument("--plan", default=None, metavar="PLAN.json",
                        help="run a saved plan (policy, per-layer slots and intervals) instead of --policy")
    parser.add_argument("--profile-trace", default=None, metavar="PATH",
                        help="static policy: choose each layer's hot set from this trace")

    parser.add_argument("--gen-tokens", type=int, default=128, help="tokens to generate per prompt (default: 128)")
    parser.add_argument("--block-length", type=int, default=32, help="positions per block (default: 32)")
    parser.add_argument("--steps", type=int, default=32,
                        help="maximum forward passes per block, 1 to the block length (default: 32)")
    parser.add_argument("--threshold", type=float, default=0.95,
                        help="commit every masked position whose confidence exceeds this (default: 0.95)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0, off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    parser.add_argument("--no-eos-stop", action="store_true",
                        help="keep denoising after the end-of-text token (the output is still cut there)")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="feed the whole sequence every step instead of caching finished blocks")

    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="accelerator (default: cuda when available, else cpu)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="threads that run CPU expert work in parallel (default: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch intra-op threads of each lane (default: 1 on the CPU device, where the "
                             "lanes share the cores; PyTorch's default on CUDA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    parser.add_argument("--trace-out", default=None, metavar="PATH", help="write the run's trace (safetensors)")
    parser.add_argument("--timeline-out", default=None, metavar="PATH",
                        help="write the measured timeline (Chrome trace JSON, opens in Perfetto)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from executor.generate import BlockDiffusionConfig
    from executor.session import (Prompt, RunOptions, default_intra_op_threads, read_prompts, resolve_device,
                                  run_generation)

    if args.interval < 1:
        raise InputError("the refresh interval must be at least 1", field="interval", value=args.interval)
    gpu_memory = parse_size(args.gpu_memory, field="gpu_memory") if args.gpu_memory is not None else None
    config = BlockDiffusionConfig(gen_tokens=args.gen_tokens, block_length=args.block_length, steps=args.steps,
                                  threshold=args.threshold, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, eos_early_stop=not args.no_eos_stop,
                                  kv_cache=not args.no_kv_cache)
    options = RunOptions(model=args.model, policy=args.policy, interval=args.interval, slots=args.slots,
                         gpu_memory_bytes=gpu_memory, plan_path=args.plan, profile_trace=args.profile_trace,
                         device=args.device, cpu_threads=args.cpu_threads, seed=args.seed)
    prompts = [Prompt("0", args.prompt)] if args.prompt is not None else read_prompts(args.prompts)
    threads = args.threads if args.threads is not None else default_intra_op_threads(resolve_device(args.device))
    if threads is not None:
        if threads < 1:
            raise InputError("must be at least 1", field="threads", value=threads)
        torch.set_num_threads(threads)

    bar = progress(None, "blocks", unit="block")
    started = time.perf_counter()

    def on_block(blocks_done: int, committed_tokens: int) -> None:
        bar.update(blocks_done - bar.n)
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{committed_tokens / elapsed:.1f} tok/s" if elapsed > 0 else "")

    try:
        result = run_generation(options, prompts, config, trace_out=args.trace_out,
                                timeline_out=args.timeline_out, on_block=on_block)
    finally:
        bar.close()

    summary = result.summary
    outputs = [{"id": prompt.id, "text": text, "tokens": len(output.token_ids), "stop": output.stop_reason}
               for prompt, text, output in zip(result.prompts, result.texts, result.outputs)]
    record = {"text": result.texts[0], **summary, "outputs": outputs}
    if args.trace_out:
        record["trace"] = args.trace_out
    if args.timeline_out:
        record["timeline"] = args.timeline_out
    emit(record, _human(result, outputs), args.json)
    return 0


def _human(result, outputs) -> str:
    summary = result.summary
    lines = []
    for output in outputs:
        if len(outputs) > 1:
            lines.append(f"--- {output['id']} ({output['tokens']} tokens, stop: {output['stop']})")
        lines.append(output["text"])
    busy = summary["lane_busy_s"]
    rows = [
        ["policy", summary["policy"]],
        ["slots per MoE layer", summary["slots"]],
        ["device", f"{summary['device']} (master copies {'pinned' if summary['pinned'] else 'pageable'})"],
        ["tokens", f"{summary['tokens']} returned, {summary['committed_tokens']} committed"],
        ["tokens/s", summary["tokens_per_s"]],
        ["committed per denoising pass", f"{summary['tokens_per_forward']:.2f}"],
        ["forward passes", summary["num_forwards"]],
        ["hit rate", summary["hit_rate"]],
        ["bytes to accelerator", format_bytes(summary["h2d_bytes"])],
        ["bytes to host", format_bytes(summary["d2h_bytes"])],
        ["busy s (gpu/h2d/d2h/cpu)", " / ".join(f"{busy[lane]:.3f}" for lane in ("gpu", "h2d", "d2h", "cpu"))],
    ]
    lines += ["", format_table(rows, ["summary", "value"])]
    return "\n".join(lines)
