"""``tide trace synth``: write a synthetic trace for any model spec."""

from __future__ import annotations

import argparse
import logging
import time

from tide.cli.common import add_json_flag, emit
from tide.spec import load_spec
from tide.synth import GENERIC_SYNTH_DEFAULTS, SYNTH_DEFAULTS, synthesize_trace
from tide.trace import save_trace

logger = logging.getLogger(__name__)


def register_synth(trace_subparsers) -> None:
    """Add ``synth`` to the subcommands of ``tide trace``."""
    defaults = ", ".join(f"{name} {d.tokens_per_forward}/{d.skew}/{d.persistence}/{d.drift}/{d.context_share}"
                         for name, d in SYNTH_DEFAULTS.items())
    generic = GENERIC_SYNTH_DEFAULTS
    parser = trace_subparsers.add_parser(
        "synth", help="write a synthetic trace for any model spec",
        description="Draw the routing of a generation run from a few statistics and write it as a trace. "
                    "The same arguments always give a byte-identical file. Defaults for tokens per "
                    f"forward/skew/persistence/drift/context share: {defaults}; other specs "
                    f"{generic.tokens_per_forward}/{generic.skew}/{generic.persistence}/{generic.drift}/"
                    f"{generic.context_share}.")
    parser.add_argument("--model", required=True, metavar="SPEC",
                        help="a shipped spec name (see 'tide spec list'), a config.json or a checkpoint folder")
    parser.add_argument("--gen-tokens", type=int, required=True, metavar="N",
                        help="generated tokens, a multiple of --block-length")
    parser.add_argument("--prompt-tokens", type=int, default=64, metavar="N", help="prompt tokens (default: 64)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")

    # Generation settings and the routing statistics (the knobs).
    parser.add_argument("--block-length", type=int, default=32, metavar="N",
                        help="positions denoised together (default: 32)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="maximum denoising steps per block (default: the block length)")
    parser.add_argument("--tokens-per-forward", type=float, default=None, metavar="X",
                        help="tokens committed per denoising pass, mean (default: per spec)")
    parser.add_argument("--skew", type=float, nargs="+", default=None, metavar="S",
                        help="Zipf exponent of expert popularity: one value, or one per MoE layer; 0 is uniform "
                             "(default: per spec)")
    parser.add_argument("--persistence", type=float, default=None, metavar="P",
                        help="probability that a token keeps an expert from one step to the next (default: per spec)")
    parser.add_argument("--drift", type=float, default=None, metavar="D",
                        help="how much the context part of expert popularity changes from one block to the next: "
                             "0 never, 1 a new draw every block (default: per spec)")
    parser.add_argument("--context-share", type=float, default=None, metavar="C",
                        help="share of expert popularity that follows the prompt and block rather than the model, "
                             "0 to 1; the model part is the same for every seed (default: per spec)")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="feed the whole sequence at every step, with no cache-write passes")

    parser.add_argument("--out", required=True, metavar="PATH", help="trace file to write")
    add_json_flag(parser)
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    spec = load_spec(args.model)
    skew = args.skew[0] if args.skew is not None and len(args.skew) == 1 else args.skew
    began = time.perf_counter()
    trace = synthesize_trace(spec, gen_tokens=args.gen_tokens, prompt_tokens=args.prompt_tokens, seed=args.seed,
                             block_length=args.block_length, steps=args.steps,
                             tokens_per_forward=args.tokens_per_forward, skew=skew,
                             persistence=args.persistence, drift=args.drift, context_share=args.context_share,
                             kv_cache=not args.no_kv_cache)
    save_trace(trace, args.out)
    logger.info("wrote %s in %.2f s", args.out, time.perf_counter() - began)

    kinds: dict[str, int] = {}
    for forward in trace.forwards:
        kinds[forward.kind] = kinds.get(forward.kind, 0) + 1
    settings = dict(trace.metadata.extra["synthetic"])
    result = {
        "path": args.out,
        "spec": spec.name,
        "num_forwards": trace.num_forwards,
        "forwards_by_kind": kinds,
        "generated_tokens": sum(f.committed_tokens for f in trace.forwards),
        "settings": settings,
    }
    human = (f"wrote {args.out}: {trace.num_forwards} forward passes ("
             + ", ".join(f"{kind} {count}" for kind, count in kinds.items())
             + f") for {spec.name}, {result['generated_tokens']} generated tokens, seed {args.seed}")
    emit(result, human, args.json)
    return 0
