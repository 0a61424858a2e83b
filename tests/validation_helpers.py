"""Runs and profiles shared by the calibration, validation and CI gate tests.

``gate_run`` is the CI gate's run: a quick calibration whose engine runs take turns with
the validation of every policy on the embedded model. It takes tens of seconds, so it
runs once per test session and the tests that need it share it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

GATE_REPEATS = 5


@functools.cache
def gate_run():
    """Calibrate (quick) and validate every runnable policy on the embedded model, interleaved."""
    import torch

    from tide.calibrate import CalibrationSession
    from tide.validate import ValidationSettings, run_validation

    threads = torch.get_num_threads()
    try:
        session = CalibrationSession(quick=True)
        return run_validation(None, ValidationSettings(repeats=GATE_REPEATS), calibration=session)
    finally:
        # Calibration pins PyTorch to its thread count; the tests after this one keep theirs.
        torch.set_num_threads(threads)


def perturb_profile(profile, *, copy_bandwidth: float = 1.0, cpu_speed: float = 1.0):
    """Return ``profile`` with its copies ``copy_bandwidth`` times as fast per byte and its CPU
    lane ``cpu_speed`` times as fast, in the calibration tables and in the datasheet figures."""
    from tide.hardware import COPY_KINDS, CalibrationTable

    tables = dict(profile.tables)
    for kind, table in profile.tables.items():
        fixed = profile.fixed_cost_s(kind)
        if kind in COPY_KINDS:
            seconds = tuple(fixed + (s - fixed) / copy_bandwidth for s in table.seconds)
        elif kind == "cpu_experts":
            seconds = tuple(s / cpu_speed for s in table.seconds)
        else:
            continue
        tables[kind] = CalibrationTable(table.x_name, table.x, seconds)
    overhead = dict(profile.op_overhead_s)
    overhead["cpu"] /= cpu_speed
    link = profile.link
    faster = {name: getattr(link, name) * copy_bandwidth for name in (
        "h2d_pinned_bytes_per_s", "d2h_pinned_bytes_per_s", "h2d_pageable_bytes_per_s", "d2h_pageable_bytes_per_s")}
    link = dataclasses.replace(link, datasheet_bytes_per_s=max(link.datasheet_bytes_per_s, *faster.values()), **faster)
    cpu = dataclasses.replace(profile.cpu, expert_flops=profile.cpu.expert_flops * cpu_speed)
    return dataclasses.replace(profile, name=f"{profile.name} (perturbed)", tables=tables, op_overhead_s=overhead,
                               link=link, cpu=cpu)


def write_copy_heavy_model(folder: Path) -> Path:
    """Write a checkpoint whose experts are large next to everything else, so copies matter.

    Three layers of 64 hidden units, 16 experts of 4096 intermediate units (3 MiB each in
    float32), top-2 routing and no shared expert, with the byte-level tokenizer. With two slots per layer,
    ``lru-fetch`` copies nearly every routed expert, and copies take about a fifth of a
    pass on a CPU device (measured on a 2-core development machine).
    """
    import torch

    from executor.model import LLaDA2MoeConfig, LLaDA2MoeForCausalLM
    from executor.tokenizer import ByteTokenizer

    config_json = {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "torch_dtype": "float32",
        "vocab_size": 512, "eos_token_id": 256, "mask_token_id": 257, "pad_token_id": 258,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "hidden_size": 64, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
        "num_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 4096, "num_shared_experts": 0,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "score_function": "sigmoid",
        "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "use_qk_norm": True, "use_qkv_bias": False, "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    config = LLaDA2MoeConfig(**config_json)
    model = LLaDA2MoeForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    ByteTokenizer(config.eos_token_id, config.mask_token_id, config.pad_token_id).save(folder)
    return folder
