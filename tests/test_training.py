"""Tests of the embedded model's training: objective, load balancing, resume and bits per byte."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from executor.generate import block_causal_mask as generation_block_causal_mask
from executor.model import LLaDA2MoeConfig, LLaDA2MoeForCausalLM
from executor.training.corpus import is_held_out, load_corpus
from executor.training.moe import enable_training_forward, update_expert_bias
from executor.training.objective import (bits_per_byte, block_causal_mask, diffusion_loss, mask_fixed_fraction,
                                         mask_tokens, sample_mask_ratios, unigram_bits_per_byte)
from executor.training.tokenizer import token_byte_lengths, train_bpe_tokenizer
from executor.training.trainer import (TrainSettings, check_settings, learning_rate, prepare_run,
                                       save_checkpoint)

TOY_SHAPE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}

TOY_SOURCE = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count
'''


def toy_model(vocab_size: int = 64, seed: int = 0) -> LLaDA2MoeForCausalLM:
    torch.manual_seed(seed)
    config = LLaDA2MoeConfig(vocab_size=vocab_size, eos_token_id=0, mask_token_id=1, pad_token_id=2, **TOY_SHAPE)
    return LLaDA2MoeForCausalLM(config)


def toy_corpus(root: Path) -> Path:
    """Write a few source files, at least one of which the hash split holds out."""
    names = [f"module_{i}.py" for i in range(12)]
    held_out = next(f"extra_{i}.py" for i in range(1000) if is_held_out(f"extra_{i}.py"))
    for n, name in enumerate(names + [held_out]):
        (root / name).write_text(TOY_SOURCE.replace("Counter", f"Counter{n}") * 3, encoding="utf-8")
    return root


# ----------------------------------------------------------------------------------------
# Objective


def test_block_causal_mask_matches_generation():
    ours = block_causal_mask(96, 32)
    assert torch.equal(ours, generation_block_causal_mask(96, 32, "cpu"))
    # Bidirectional inside a block, causal across blocks.
    assert bool(ours[0, 31])
    assert not bool(ours[0, 32])
    assert bool(ours[40, 0])
    assert bool(ours[40, 63])
    assert not bool(ours[40, 64])


def test_mask_ratios_stratified():
    ratios = sample_mask_ratios(8, 1e-3, torch.Generator().manual_seed(3))
    strata = sorted(int((float(r) - 1e-3) / (1 - 1e-3) * 8) for r in ratios)
    assert strata == list(range(8))
    assert float(ratios.min()) > 1e-3
    assert float(ratios.max()) <= 1.0


def test_fixed_fraction_masks_exact_count():
    ids = torch.arange(3, 103).repeat(4, 1)
    noisy, masked = mask_fixed_fraction(ids, 0.15, mask_token_id=1, generator=torch.Generator().manual_seed(0))
    assert masked.sum(dim=1).tolist() == [15, 15, 15, 15]
    assert torch.equal(noisy[masked], torch.ones(60, dtype=torch.long))
    assert torch.equal(noisy[~masked], ids[~masked])


def test_loss_falls_after_few_steps():
    model = toy_model()
    enable_training_forward(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Each row repeats a period-8 pattern, so a masked token is predictable from its neighbours.
    batch = 3 + (torch.arange(64)[None, :] + torch.arange(4)[:, None] * 5) % 8

    def fixed_noise_loss() -> float:
        with torch.no_grad():
            loss, _ = diffusion_loss(model, batch, 1, 32, torch.Generator().manual_seed(123))
        return float(loss)

    before = fixed_noise_loss()
    for step in range(25):
        loss, _ = diffusion_loss(model, batch, 1, 32, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_noise_loss()
    assert after < 0.6 * before, (before, after)


def test_loss_weightings_by_hand():
    model = toy_model()
    enable_training_forward(model)
    batch = torch.randint(3, 64, (4, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        elbo, stats = diffusion_loss(model, batch, 1, 32, torch.Generator().manual_seed(9), weighting="elbo")
        mean, _ = diffusion_loss(model, batch, 1, 32, torch.Generator().manual_seed(9), weighting="token_mean")

        # Repeat the draws of diffusion_loss with the same seed and compute both losses directly.
        generator = torch.Generator().manual_seed(9)
        ratios = sample_mask_ratios(4, 1e-3, generator)
        noisy, masked = mask_tokens(batch, ratios, 1, generator)
        mask = block_causal_mask(64, 32)[None, None]
        logits = model(noisy, attention_mask=mask).logits
        cross_entropy = torch.nn.functional.cross_entropy(logits[masked], batch[masked], reduction="none")
        weights = (1.0 / ratios)[:, None].expand(-1, 64)[masked]
    assert float(mean) == pytest.approx(float(cross_entropy.mean()), rel=1e-5)
    assert float(elbo) == pytest.approx(float((cross_entropy * weights).sum() / batch.numel()), rel=1e-5)
    assert stats["masked_tokens"] == int(masked.sum())
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(model, batch, 1, 32, torch.Generator(), weighting="uniform")


def test_training_forward_matches_model_forward():
    model = toy_model()
    reference = copy.deepcopy(model)
    enable_training_forward(model)
    model.eval()
    reference.eval()
    ids = torch.randint(3, 64, (2, 64), generator=torch.Generator().manual_seed(2))
    mask = block_causal_mask(64, 32)[None, None]
    with torch.no_grad():
        trained_path = model(ids, attention_mask=mask).logits
        packed_path = reference(ids, attention_mask=mask).logits
    torch.testing.assert_close(trained_path, packed_path, rtol=1e-5, atol=1e-5)


def test_training_forward_trains_experts_and_router():
    model = toy_model()
    enable_training_forward(model)
    batch = torch.randint(3, 64, (2, 64), generator=torch.Generator().manual_seed(4))
    loss, _ = diffusion_loss(model, batch, 1, 32, torch.Generator().manual_seed(0))
    loss.backward()
    block = model.moe_blocks()[0]
    expert_grads = [e.gate_proj.weight.grad for e in block.experts]
    assert sum(g is not None and float(g.abs().sum()) > 0 for g in expert_grads) >= 2
    assert float(block.gate.weight.grad.abs().sum()) > 0


def test_expert_bias_moves_toward_balance():
    model = toy_model()
    counter = enable_training_forward(model)
    counter.counts[0] = torch.tensor([10, 0, 2, 2, 2, 2, 2, 4])  # mean 3
    imbalance = update_expert_bias(counter, rate=0.5)
    bias = model.moe_blocks()[0].gate.expert_bias
    assert bias.tolist() == [-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5]
    assert imbalance == pytest.approx(10 / 3)
    assert int(counter.counts[0].sum()) == 0


# ----------------------------------------------------------------------------------------
# Bits per byte


def test_bits_per_byte_by_hand():
    # Two masked positions: p(target) = 1/2 and 1/4 give 1 + 2 = 3 bits over 2 + 4 = 6 bytes.
    probabilities = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]])
    result = bits_per_byte(probabilities.log(), torch.tensor([0, 1]), torch.tensor([2, 4, 1]))
    assert result.total_bits == pytest.approx(3.0)
    assert result.total_bytes == 6
    assert result.bits_per_byte == pytest.approx(0.5)
    assert result.bits_per_token == pytest.approx(1.5)


def test_unigram_bits_per_byte_by_hand():
    # Add-one counts over 256 byte values: a 3, b 2, others 1, of 259.
    expected = -(math.log2(3 / 259) + math.log2(2 / 259)) / 2
    assert unigram_bits_per_byte(b"aab", b"ab") == pytest.approx(expected)


def test_token_byte_lengths_sum_to_text_bytes():
    tokenizer = train_bpe_tokenizer([TOY_SOURCE] * 4, vocab_size=300)
    lengths = token_byte_lengths(tokenizer)
    text = TOY_SOURCE + "π = 3.14  # non-ASCII\n"
    ids = tokenizer.encode(text).ids
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_to_id("<|mask|>")] == 0


# ----------------------------------------------------------------------------------------
# Schedule, settings and resume


def test_learning_rate_warmup_stable_decay():
    settings = TrainSettings(max_steps=1000, warmup_steps=100, decay_fraction=0.2, peak_lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(settings, 0) == pytest.approx(1e-5)
    assert learning_rate(settings, 99) == pytest.approx(1e-3)
    assert learning_rate(settings, 799) == pytest.approx(1e-3)
    assert learning_rate(settings, 900) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))
    assert learning_rate(settings, 1000) == pytest.approx(1e-4)


def test_check_settings_allows_max_steps_before_decay():
    stored = TrainSettings(max_steps=3000)
    check_settings(stored, replace(stored, max_steps=2000), resume_step=1500)
    with pytest.raises(ValueError, match="max_steps"):
        check_settings(stored, replace(stored, max_steps=2000), resume_step=1700)
    with pytest.raises(ValueError, match="peak_lr"):
        check_settings(stored, replace(stored, peak_lr=1.0), resume_step=0)


def test_corpus_split_disjoint(tmp_path):
    corpus = load_corpus(toy_corpus(tmp_path))
    train = {f.relative_path for f in corpus.train}
    held_out = {f.relative_path for f in corpus.held_out}
    assert held_out
    assert train
    assert not train & held_out
    assert all(is_held_out(name) for name in held_out)
    assert len(corpus.file_list_sha256()) == 64


def test_resume_continues_exactly(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus_root = toy_corpus(tmp_path / "corpus")
    shape_path = tmp_path / "shape.json"
    shape_path.write_text(json.dumps(TOY_SHAPE), encoding="utf-8")
    settings = TrainSettings(vocab_size=300, batch_size=2, seq_len=64, max_steps=8, warmup_steps=2,
                             peak_lr=5e-3, bias_update_rate=1e-2)

    uninterrupted = prepare_run(tmp_path / "a", settings, shape_path, corpus_root)
    losses = [uninterrupted.train_step()["loss"] for _ in range(4)]

    first = prepare_run(tmp_path / "b", settings, shape_path, corpus_root)
    assert [first.train_step()["loss"] for _ in range(2)] == losses[:2]
    save_checkpoint(first.run_dir, first.model, first.optimizer, first.step, elapsed_s=1.0)
    resumed = prepare_run(tmp_path / "b", settings, shape_path, corpus_root)
    assert resumed.step == 2
    assert [resumed.train_step()["loss"] for _ in range(2)] == losses[2:]
    biases = [b.gate.expert_bias for b in resumed.model.moe_blocks()]
    assert torch.equal(biases[0], uninterrupted.model.moe_blocks()[0].gate.expert_bias)
