"""Lossless: for greedy decoding, every policy and slot budget yields the tokens of all-gpu.

No policy may skip, approximate or reorder an expert's contribution, so on the CPU device
the tokens must be identical, not merely close.
"""

from __future__ import annotations

import pytest
import torch

from executor.generate import BlockDiffusionConfig
from executor.session import EMBEDDED_MODEL_DIR, Prompt, RunOptions, load_model, load_model_spec, run_generation
from executor.tokenizer import load_tokenizer

PROMPTS = [
    Prompt("fib", "def fibonacci(n):"),
    Prompt("sort", "# Sort a list of numbers in place and return it.\ndef sort_numbers(values):\n"),
    Prompt("short", "x"),
]
CONFIG = BlockDiffusionConfig(gen_tokens=32, block_length=16, steps=8)
NUM_EXPERTS = load_model_spec(EMBEDDED_MODEL_DIR).num_experts
BUDGETS = {"none": 0, "some": NUM_EXPERTS * 3 // 8, "all": NUM_EXPERTS}

CASES = [("cpu-experts", 2, 0)]
for budget in BUDGETS.values():
    CASES += [("tide", 1, budget), ("tide", 2, budget), ("tide", 4, budget), ("every-step", 1, budget),
              ("static", 2, budget), ("lru-fetch", 2, budget)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(EMBEDDED_MODEL_DIR), load_tokenizer(EMBEDDED_MODEL_DIR)


def generate_tokens(model_and_tokenizer, policy: str, interval: int, slots: int | None,
                    config: BlockDiffusionConfig = CONFIG):
    model, tokenizer = model_and_tokenizer
    options = RunOptions(policy=policy, interval=interval, slots=slots, device="cpu")
    result = run_generation(options, PROMPTS, config, model=model, tokenizer=tokenizer)
    return [o.token_ids for o in result.outputs], result.summary


@pytest.fixture(scope="module")
def reference(model_and_tokenizer):
    tokens, summary = generate_tokens(model_and_tokenizer, "all-gpu", 2, None)
    assert summary["hit_rate"] == 1.0
    assert all(len(t) > 0 for t in tokens)
    return tokens


@pytest.mark.parametrize("policy, interval, slots", CASES)
def test_same_tokens_as_all_gpu(model_and_tokenizer, reference, policy, interval, slots):
    tokens, summary = generate_tokens(model_and_tokenizer, policy, interval, slots)
    assert tokens == reference
    assert summary["slots"] == slots
    if 0 < slots < NUM_EXPERTS:
        # A partial budget must really offload something, or the check proves nothing.
        assert summary["misses"] > 0
        assert summary["hits"] > 0


@pytest.mark.parametrize("policy, slots", [("tide", BUDGETS["some"]), ("lru-fetch", BUDGETS["some"])])
def test_same_tokens_without_kv_cache(model_and_tokenizer, policy, slots):
    config = BlockDiffusionConfig(gen_tokens=24, block_length=16, steps=8, kv_cache=False)
    reference_tokens, _ = generate_tokens(model_and_tokenizer, "all-gpu", 2, None, config)
    tokens, _ = generate_tokens(model_and_tokenizer, policy, 2, slots, config)
    assert tokens == reference_tokens
