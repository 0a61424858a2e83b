"""``tide trace info PATH``: a trace's settings and routing statistics."""

from __future__ import annotations

from tide.cli.common import add_json_flag, emit, format_table
from tide.cli.trace_synth_cmd import register_synth
from tide.trace import load_trace
from tide.trace_stats import compute_stats, interval_hit_rate


def register(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="inspect and make expert-activation traces")
    commands = parser.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)
    info = commands.add_parser("info", help="print a trace's settings and statistics")
    info.add_argument("path", help="trace file (.trace, safetensors)")
    info.add_argument("--slots", type=int, action="append", default=None, metavar="N",
                      help="slot budget per MoE layer for the hit-rate table (repeatable; default: E/4, E/2)")
    info.add_argument("--interval", type=int, action="append", default=None, metavar="TAU",
                      help="refresh interval τ for the hit-rate table (repeatable; default: 1, 2, 4)")
    add_json_flag(info)
    info.set_defaults(func=run_info)
    register_synth(commands)


def run_info(args) -> int:
    trace = load_trace(args.path)
    meta = trace.metadata
    stats = compute_stats(trace)
    budgets = args.slots or sorted({max(1, meta.num_experts // 4), max(1, meta.num_experts // 2)})
    intervals = args.interval or [1, 2, 4]
    for budget in budgets:
        if not 0 <= budget <= meta.num_experts:
            from tide.errors import InputError

            raise InputError("slot budget outside the layer's experts", field="--slots", value=budget,
                             accepted=f"0 to {meta.num_experts}")
    hit_rates = {f"slots={b},interval={t}": interval_hit_rate(trace, b, t) for b in budgets for t in intervals}
    gen = meta.generation
    human_lines = [
        f"{args.path}",
        f"  model             {meta.spec_name} (config {meta.spec_hash}), {meta.num_moe_layers} MoE layers, "
        f"{meta.num_experts} experts, top-{meta.top_k}",
        f"  source            {meta.source}, prompts {len(meta.prompt_ids)}, tool {meta.tool_version}, "
        f"created {meta.created_at}",
        f"  generation        block {gen.block_length}, steps {gen.steps}, threshold {gen.threshold}, "
        f"temperature {gen.temperature}, KV cache {'on' if gen.kv_cache else 'off'}",
        f"  forward passes    {stats.num_forwards} "
        + ", ".join(f"{k} {v}" for k, v in sorted(stats.forwards_by_kind.items())),
        f"  tokens            {stats.returned_tokens} returned, {stats.generated_tokens} committed "
        f"({stats.tokens_per_forward:.2f} per denoising pass)",
        f"  distinct experts  {stats.distinct_experts_per_forward:.1f} per pass and layer",
        f"  adjacent steps    overlap {stats.adjacent_step_overlap:.3f}, cosine {stats.adjacent_step_cosine:.3f}",
        "",
        format_table([[b] + [hit_rates[f"slots={b},interval={t}"] for t in intervals] for b in budgets],
                     ["hit rate: slots \\ τ"] + [str(t) for t in intervals]),
    ]
    result = {"path": args.path, "metadata": meta.to_json(), "stats": stats.to_json(), "hit_rate": hit_rates}
    emit(result, "\n".join(human_lines), args.json)
    return 0
