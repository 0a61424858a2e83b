"""Train the embedded ``tiny`` LLaDA2 model from scratch with the masked-diffusion objective.

The corpus is the running interpreter's standard library (``executor.training.corpus``),
tokenized with the byte-level BPE tokenizer from ``scripts/train_tokenizer.py`` (trained
here first when the run folder has none). The model classes are ``executor.model``'s, the
same code that loads any LLaDA2 checkpoint.

The run is seeded and reproducible (see ``executor.training.trainer``). Run the script
again with the same ``--run-dir`` and settings to resume from the newest checkpoint.

Usage:
    python scripts/train_embedded.py --run-dir runs/train-tiny --time-budget-s 5700
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

import torch

from executor.training.trainer import DEFAULT_SHAPE, TrainSettings, export_final, prepare_run, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/train-tiny"),
                        help="folder for settings, tokenizer, token cache, log and checkpoints")
    parser.add_argument("--shape", type=Path, default=DEFAULT_SHAPE,
                        help="model shape as config.json fields (vocabulary and token ids come from the tokenizer)")
    parser.add_argument("--time-budget-s", type=float, default=5700.0,
                        help="stop after this many seconds of training, counted across resumes")
    parser.add_argument("--checkpoint-every-s", type=float, default=300.0, help="seconds between checkpoints")
    parser.add_argument("--log-every-steps", type=int, default=10, help="steps between log records")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--export-only", action="store_true",
                        help="export the newest checkpoint to RUN_DIR/final without training further")
    parser.add_argument("--install", action="store_true",
                        help="install RUN_DIR/final as the embedded default model (tide/data/models/tiny) "
                             "and rewrite the tiny spec to its shape, then exit")
    defaults = TrainSettings()
    for field in fields(TrainSettings):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name), help=f"training setting (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.install:
        from executor.training.export import install_embedded_model

        install_embedded_model(args.run_dir / "final")
        return
    settings = TrainSettings(**{field.name: getattr(args, field.name) for field in fields(TrainSettings)})
    trainer = prepare_run(args.run_dir, settings, args.shape)
    if args.export_only:
        export_final(trainer, args.run_dir / "final")
        return
    run(trainer, args.time_budget_s, args.checkpoint_every_s, args.log_every_steps)


if __name__ == "__main__":
    main()
