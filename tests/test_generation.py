"""Block diffusion generation: the KV cache is exact, long prompts, end-of-text stop, sampling."""

from __future__ import annotations

import pytest
import torch

from executor.generate import (
    BlockDiffusionConfig,
    PlainRunner,
    block_causal_mask,
    choose_commits,
    generate,
    num_transfer_tokens,
)
from executor.model import KVCache
from executor.session import EMBEDDED_MODEL_DIR, load_model, load_model_spec
from executor.tokenizer import load_tokenizer
from tide.errors import InputError

SPEC = load_model_spec(EMBEDDED_MODEL_DIR)
EOS, MASK = SPEC.eos_token_id, SPEC.mask_token_id
TOKENIZER = load_tokenizer(EMBEDDED_MODEL_DIR)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runner():
    return PlainRunner(load_model(EMBEDDED_MODEL_DIR))


def run(runner, prompt: str, **settings):
    config = BlockDiffusionConfig(**{"gen_tokens": 40, "block_length": 16, "steps": 8, **settings})
    return generate(runner, TOKENIZER.encode(prompt), config, mask_token_id=MASK, eos_token_id=EOS)


def test_transfer_schedule_covers_block():
    assert num_transfer_tokens(32, 32) == [1] * 32
    assert num_transfer_tokens(32, 12) == [3] * 8 + [2] * 4
    assert sum(num_transfer_tokens(16, 5)) == 16


def test_block_causal_mask():
    mask = block_causal_mask(6, 2, "cpu")
    assert mask[0].tolist() == [True, True, False, False, False, False]
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert mask[5].all()


def test_commits_above_threshold_or_most_confident():
    confidence = torch.tensor([0.99, 0.2, 0.97, 0.5, 0.6])
    masked = torch.tensor([True, True, True, True, False])
    assert choose_commits(confidence, masked, 0.95, 1).tolist() == [True, False, True, False, False]
    # Too few above the threshold: the scheduled number of most confident masked positions.
    assert choose_commits(confidence, masked, 0.995, 3).tolist() == [True, False, True, True, False]
    # Never more than the masked positions.
    assert choose_commits(confidence, torch.tensor([False, True, False, False, False]), 0.99, 3).sum() == 1


def test_cache_matches_full_forward(runner):
    model = runner.model
    # Ordinary tokens only: the special ids sit at the start of the trained vocabulary.
    first_plain = max(EOS, MASK) + 2
    ids = torch.randint(first_plain, SPEC.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids, attention_mask=block_causal_mask(24, 8, "cpu")).logits[0]
        cache = KVCache(model.config, 24, dtype=model.get_input_embeddings().weight.dtype, device="cpu")
        model(ids[:, :16], attention_mask=block_causal_mask(16, 8, "cpu"), kv_cache=cache, write_cache=True)
        assert cache.length == 16
        last_block = model(ids[:, 16:], kv_cache=cache).logits[0]
        assert cache.length == 16  # a pass without write_cache keeps nothing
    torch.testing.assert_close(last_block, full[16:], rtol=1e-5, atol=1e-5)


def test_greedy_same_with_and_without_cache(runner):
    for prompt in ("def fibonacci(n):", "x"):
        cached = run(runner, prompt)
        uncached = run(runner, prompt, kv_cache=False)
        assert cached.token_ids == uncached.token_ids
        assert len(cached.token_ids) > 0
        kinds = {f.kind for f in uncached.forwards}
        assert kinds == {"denoise"}
        assert all(f.num_tokens == f.context_tokens for f in uncached.forwards)


def test_prompt_longer_than_block(runner):
    prompt = "# A prompt that spans more than two blocks of sixteen tokens, " * 3
    prompt_length = len(TOKENIZER.encode(prompt))
    assert prompt_length > 32
    cached = run(runner, prompt)
    uncached = run(runner, prompt, kv_cache=False)
    assert cached.token_ids == uncached.token_ids
    forwards = cached.forwards
    assert forwards[0].kind == "prefill"
    assert forwards[0].num_tokens == (prompt_length // 16) * 16
    assert forwards[1].kind == "denoise"
    assert forwards[1].block == 0
    assert forwards[1].step == 0
    # The first denoised block holds the prompt's last partial block, and the pass feeds only that block.
    assert forwards[1].num_tokens == 16
    assert forwards[1].context_tokens == (prompt_length // 16 + 1) * 16
    writes = [f for f in forwards if f.kind == "cache_write"]
    assert len(writes) == cached.num_blocks - 1
    assert [f.index for f in forwards] == list(range(len(forwards)))


class EosAfter:
    """Wraps a runner so that end of text is near certain at ``first_position`` and after."""

    def __init__(self, runner, first_position: int) -> None:
        self.inner = runner
        self.device = runner.device
        self.first_position = first_position

    def new_kv_cache(self, max_tokens):
        return self.inner.new_kv_cache(max_tokens)

    def forward(self, input_ids, *, position_ids, **kwargs):
        logits = self.inner.forward(input_ids, position_ids=position_ids, **kwargs).clone()
        late = position_ids[0] >= self.first_position
        logits[late, EOS] = 100.0
        return logits

    def end_forward(self, info):
        self.inner.end_forward(info)


def test_stops_at_eos(runner):
    prompt = "def f():"
    full = run(runner, prompt, gen_tokens=48)
    eos_at = len(TOKENIZER.encode(prompt)) + 5
    stopped = run(EosAfter(runner, eos_at), prompt, gen_tokens=48)
    assert stopped.stop_reason == "eos"
    assert len(stopped.token_ids) == 5
    assert EOS not in stopped.token_ids
    assert len(stopped.forwards) < len(full.forwards)
    # Without the early stop every block is denoised, and the output is still cut at end of text.
    kept_going = run(EosAfter(runner, eos_at), prompt, gen_tokens=48, eos_early_stop=False)
    assert kept_going.token_ids == stopped.token_ids
    assert len(kept_going.forwards) > len(stopped.forwards)


def test_sampling_is_seeded(runner):
    def sample(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        config = BlockDiffusionConfig(gen_tokens=24, block_length=8, steps=4, temperature=1.0, top_k=50, top_p=0.9)
        return generate(runner, TOKENIZER.encode("abc"), config, mask_token_id=MASK, eos_token_id=EOS,
                        generator=generator).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_settings_rejected():
    with pytest.raises(InputError, match="steps"):
        BlockDiffusionConfig(block_length=8, steps=9)
    with pytest.raises(InputError, match="threshold"):
        BlockDiffusionConfig(threshold=1.5)
    with pytest.raises(InputError, match="top_p"):
        BlockDiffusionConfig(top_p=0.0)


def test_empty_prompt_rejected(runner):
    with pytest.raises(InputError, match="empty"):
        generate(runner, [], BlockDiffusionConfig(), mask_token_id=MASK, eos_token_id=EOS)
