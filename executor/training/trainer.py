"""The training loop of the embedded model: settings, checkpoints, resume and export.

A run lives in one folder: ``settings.json`` (checked on resume), ``corpus.json``, the
tokenizer, a token cache under ``data/``, ``log.jsonl`` and ``checkpoints/step-NNNNNN/``
(the model in the checkpoint layout, ``optimizer.pt`` and ``state.json``). Batch ``n`` and
its mask draws depend only on (seed, n). A checkpoint contains the weights, router biases,
optimizer state and step, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from executor.model import LLaDA2MoeConfig, LLaDA2MoeForCausalLM
from executor.training.corpus import load_corpus
from executor.training.data import held_out_windows, load_or_encode, sample_windows
from executor.training.moe import enable_training_forward, update_expert_bias
from executor.training.objective import diffusion_loss, evaluate_bits_per_byte
from executor.training.tokenizer import (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, save_tokenizer, token_byte_lengths,
                                         train_bpe_tokenizer)
from tide.io import write_text_atomic

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = Path(__file__).resolve().parent / "tiny_shape.json"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the run; stored in the run folder and checked on resume."""

    seed: int = 0
    vocab_size: int = 2048
    batch_size: int = 8
    seq_len: int = 512
    block_length: int = 32
    max_steps: int = 1232
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    peak_lr: float = 2.5e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mask_eps: float = 1e-3
    loss_weighting: str = "token_mean"
    bias_update_rate: float = 1e-2
    eval_every_steps: int = 250
    eval_windows: int = 32


def decay_start_step(settings: TrainSettings) -> int:
    return settings.max_steps - round(settings.decay_fraction * settings.max_steps)


def learning_rate(settings: TrainSettings, step: int) -> float:
    """Warm-up, stable, decay: linear warm-up to ``peak_lr``, constant, then linear decay to
    ``min_lr_ratio * peak_lr`` over the last ``decay_fraction`` of ``max_steps``.

    Before the decay starts the rate does not depend on ``max_steps``, so a run can be
    resumed with another ``max_steps`` (see ``check_settings``) once its speed is known.
    """
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    decay_start = decay_start_step(settings)
    if step < decay_start:
        return settings.peak_lr
    progress = min(1.0, (step - decay_start) / max(1, settings.max_steps - decay_start))
    return settings.peak_lr * (1.0 - (1.0 - settings.min_lr_ratio) * progress)


def noise_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s mask ratios and mask draws, a function of (seed, step) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0]))


def build_config(shape_path: Path, tokenizer) -> LLaDA2MoeConfig:
    """Build the model config from the shape file plus the tokenizer's vocabulary size and special token ids."""
    shape = json.loads(shape_path.read_text(encoding="utf-8"))
    shape.pop("model_type", None)
    shape.update(
        vocab_size=tokenizer.get_vocab_size(),
        eos_token_id=tokenizer.token_to_id(EOS_TOKEN),
        mask_token_id=tokenizer.token_to_id(MASK_TOKEN),
        pad_token_id=tokenizer.token_to_id(PAD_TOKEN),
    )
    return LLaDA2MoeConfig(**shape)


def build_model(config: LLaDA2MoeConfig, seed: int) -> LLaDA2MoeForCausalLM:
    torch.manual_seed(seed)
    return LLaDA2MoeForCausalLM(config)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or the 1-D router bias buffer)."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decayed, "weight_decay": settings.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.peak_lr, betas=(settings.beta1, settings.beta2), fused=False)


# ----------------------------------------------------------------------------------------
# Checkpoints: runs/NAME/checkpoints/step-NNNNNN/ with the model in the checkpoint layout,
# optimizer.pt and state.json.


def save_checkpoint(run_dir: Path, model, optimizer, step: int, elapsed_s: float, keep: int = 2) -> Path:
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(str(partial))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed_s}), encoding="utf-8")
    # The rename makes the checkpoint appear complete or not at all.
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    for old in sorted(run_dir.glob("checkpoints/step-??????"))[:-keep]:
        shutil.rmtree(old)
    logger.info("saved checkpoint %s", folder)
    return folder


def _latest_step(run_dir: Path) -> int:
    checkpoint = latest_checkpoint(run_dir)
    return int(checkpoint.name.removeprefix("step-")) if checkpoint is not None else 0


def check_settings(stored: TrainSettings, requested: TrainSettings, resume_step: int) -> None:
    """Raise ValueError unless a run with ``stored`` settings can resume at ``resume_step`` with ``requested``.

    Only ``max_steps`` may change, and only while both schedules are still before their
    decay, where the learning rate does not depend on it.
    """
    changed = {key: (value, getattr(requested, key)) for key, value in asdict(stored).items()
               if getattr(requested, key) != value}
    if not changed:
        return
    if set(changed) == {"max_steps"} and resume_step <= min(decay_start_step(stored), decay_start_step(requested)):
        logger.info("max_steps changed from %d to %d at step %d", stored.max_steps, requested.max_steps, resume_step)
        return
    raise ValueError(f"the run was started with other settings (stored, requested): {changed}; only max_steps "
                     f"may change, and only before the learning rate decays; use a new run folder otherwise")


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = sorted(run_dir.glob("checkpoints/step-??????"))
    return complete[-1] if complete else None


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, float]:
    """Restore weights, router biases and optimizer state; return (step, elapsed_s) stored in ``folder``."""
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return int(state["step"]), float(state["elapsed_s"])


# ----------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """The training state of one run, built by ``prepare_run``."""

    run_dir: Path
    settings: TrainSettings
    tokenizer: object
    model: LLaDA2MoeForCausalLM
    optimizer: torch.optim.AdamW
    counter: object
    train_stream: np.ndarray
    held_out: torch.Tensor  # [num_windows, seq_len]
    byte_lengths: torch.Tensor  # [V]
    step: int = 0
    elapsed_s: float = 0.0

    def train_step(self) -> dict:
        """Run one optimizer step on batch ``self.step``; return its log record."""
        settings = self.settings
        lr = learning_rate(settings, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = sample_windows(self.train_stream, settings.batch_size, settings.seq_len, settings.seed, self.step)
        loss, stats = diffusion_loss(self.model, batch, self.model.config.mask_token_id, settings.block_length,
                                     noise_generator(settings.seed, self.step), eps=settings.mask_eps,
                                     weighting=settings.loss_weighting)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
        self.optimizer.step()
        imbalance = update_expert_bias(self.counter, settings.bias_update_rate)
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "masked_ce": stats["masked_ce"], "lr": lr,
                "grad_norm": float(grad_norm), "load_imbalance": imbalance}

    def evaluate(self, num_windows: int | None = None) -> dict:
        windows = self.held_out if num_windows is None else self.held_out[:num_windows]
        result = evaluate_bits_per_byte(self.model, windows, self.byte_lengths, self.model.config.mask_token_id,
                                        self.settings.block_length)
        return {"held_out_bits_per_byte": result.bits_per_byte, "held_out_bits_per_token": result.bits_per_token,
                "held_out_masked_tokens": result.num_masked_tokens}


def prepare_tokenizer(run_dir: Path, corpus, vocab_size: int):
    from tokenizers import Tokenizer

    folder = run_dir / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        tokenizer = train_bpe_tokenizer((file.text for file in corpus.train), vocab_size)
        save_tokenizer(tokenizer, folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"{folder}/tokenizer.json has {tokenizer.get_vocab_size()} tokens; "
                         f"the run's settings ask for {vocab_size}")
    return tokenizer


def prepare_run(run_dir: Path, settings: TrainSettings, shape_path: Path = DEFAULT_SHAPE,
                corpus_root: Path | None = None) -> Trainer:
    """Set up (or reopen) the run in ``run_dir`` and resume from its newest checkpoint if any."""
    run_dir.mkdir(parents=True, exist_ok=True)
    settings_path = run_dir / "settings.json"
    if settings_path.is_file():
        stored = TrainSettings(**json.loads(settings_path.read_text(encoding="utf-8")))
        check_settings(stored, settings, resume_step=_latest_step(run_dir))
    write_text_atomic(settings_path, json.dumps(asdict(settings), indent=2) + "\n")

    corpus = load_corpus(corpus_root)
    write_text_atomic(run_dir / "corpus.json", json.dumps(corpus.summary(), indent=2) + "\n")
    tokenizer = prepare_tokenizer(run_dir, corpus, settings.vocab_size)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    train_stream = load_or_encode(run_dir / "data" / "train.npy", tokenizer, corpus.train, eos_id)
    held_out_stream = load_or_encode(run_dir / "data" / "held_out.npy", tokenizer, corpus.held_out, eos_id)

    config = build_config(shape_path, tokenizer)
    model = build_model(config, settings.seed)
    counter = enable_training_forward(model)
    model.train()
    optimizer = make_optimizer(model, settings)
    trainer = Trainer(run_dir, settings, tokenizer, model, optimizer, counter, train_stream,
                      held_out_windows(held_out_stream, settings.seq_len),
                      torch.tensor(token_byte_lengths(tokenizer)))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        trainer.step, trainer.elapsed_s = load_checkpoint(checkpoint, model, optimizer)
        logger.info("resumed from %s at step %d (%.0f s trained)", checkpoint, trainer.step, trainer.elapsed_s)
    return trainer


def trim_log(log_path: Path, step: int) -> None:
    """Drop log records after ``step``, which a resumed run will write again."""
    if not log_path.is_file():
        return
    kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(log_path, "".join(line + "\n" for line in kept))


def export_final(trainer: Trainer, folder: Path) -> None:
    """Write the trained model and its tokenizer as one checkpoint folder that ``from_pretrained`` reads."""
    if folder.exists():
        shutil.rmtree(folder)
    trainer.model.save_pretrained(str(folder))
    save_tokenizer(trainer.tokenizer, folder)
    logger.info("exported the final model to %s", folder)


def run(trainer: Trainer, time_budget_s: float, checkpoint_every_s: float, log_every_steps: int) -> None:
    settings = trainer.settings
    log_path = trainer.run_dir / "log.jsonl"
    trim_log(log_path, trainer.step)
    tokens_per_step = settings.batch_size * settings.seq_len
    last_checkpoint_at = time.monotonic()
    window_started_at = time.monotonic()
    window_steps = 0
    session_started_at = time.monotonic()
    session_start_elapsed = trainer.elapsed_s

    with open(log_path, "a", encoding="utf-8") as log:
        while trainer.step < settings.max_steps and trainer.elapsed_s < time_budget_s:
            record = trainer.train_step()
            window_steps += 1
            trainer.elapsed_s = session_start_elapsed + (time.monotonic() - session_started_at)

            if trainer.step % settings.eval_every_steps == 0 or trainer.step == settings.max_steps:
                record.update(trainer.evaluate(settings.eval_windows))
            if trainer.step % log_every_steps == 0 or "held_out_bits_per_byte" in record:
                now = time.monotonic()
                record["tokens_per_s"] = window_steps * tokens_per_step / (now - window_started_at)
                record["elapsed_s"] = trainer.elapsed_s
                window_started_at, window_steps = now, 0
                log.write(json.dumps(record) + "\n")
                log.flush()
                logger.info("step %d loss %.4f ce %.4f lr %.2e imbalance %.2f %.0f tokens/s %.0f s%s",
                            record["step"], record["loss"], record["masked_ce"], record["lr"],
                            record["load_imbalance"], record["tokens_per_s"], record["elapsed_s"],
                            f" held-out {record['held_out_bits_per_byte']:.3f} bits/byte"
                            if "held_out_bits_per_byte" in record else "")

            if time.monotonic() - last_checkpoint_at >= checkpoint_every_s:
                save_checkpoint(trainer.run_dir, trainer.model, trainer.optimizer, trainer.step, trainer.elapsed_s)
                last_checkpoint_at = time.monotonic()

    save_checkpoint(trainer.run_dir, trainer.model, trainer.optimizer, trainer.step, trainer.elapsed_s)
    if trainer.step >= settings.max_steps:
        export_final(trainer, trainer.run_dir / "final")
    else:
        logger.info("stopped at step %d of %d: time budget of %.0f s used", trainer.step, settings.max_steps,
                    time_budget_s)
