"""One generation run from options: model, device, memory budget, plan, engine, records.

Everything that can be checked without the weights (the model folder, the device, the
memory budget, the policy and its slots) is checked before the model is loaded.

Slots per MoE layer, in order of precedence:

* ``--plan``: the plan's own slot budgets;
* ``all-gpu``: every expert; ``cpu-experts``: none;
* ``--slots N``;
* ``--gpu-memory SIZE``: as many as ``tide.memory.plan_memory`` fits after the
  non-expert weights, the KV cache, activations and a 5% reserve;
* otherwise half of each layer's experts (``DEFAULT_SLOT_FRACTION``), so that the
  offloading policies offload something.

Each choice must fit the memory budget: ``--gpu-memory``, or the whole device when it is
not given. On the CPU device the device memory is the machine's RAM.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import tide
from executor.engine import OffloadEngine
from executor.generate import BlockDiffusionConfig, SequenceOutput, generate
from executor.records import build_timeline, build_trace, summarize
from executor.tokenizer import load_tokenizer
from tide.errors import InputError
from tide.ir import Plan, load_plan, save_timeline
from tide.memory import MemoryBudget, plan_memory
from tide.policies import check_plan_matches_spec, make_plan
from tide.io import read_json
from tide.spec import SPEC_DIR, ModelSpec, spec_from_config
from tide.trace import check_trace_matches_spec, load_trace, save_trace
from tide.units import format_bytes

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_DIR = Path(tide.__file__).resolve().parent / "data" / "models" / "tiny"
EMBEDDED_MODEL_NAME = "tiny"
DEFAULT_SLOT_FRACTION = 0.5
RESERVE_FRACTION = 0.05  # the default of tide.memory.plan_memory
RUN_POLICIES = ("all-gpu", "tide", "every-step", "static", "lru-fetch", "cpu-experts")


@dataclass(frozen=True)
class RunOptions:
    """Options of one run: the model, the policy and the accelerator memory it may use."""

    model: str | None = None  # checkpoint folder, or None / "tiny" for the embedded model
    policy: str = "tide"
    interval: int = 2
    slots: int | None = None
    gpu_memory_bytes: int | None = None
    plan_path: str | None = None
    profile_trace: str | None = None  # static policy: choose hot sets from this trace
    device: str | None = None  # "cuda", "cpu" or None for cuda when available
    cpu_threads: int = 1
    seed: int = 0
    pin_memory: bool | None = None


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


@dataclass
class RunResult:
    outputs: list[SequenceOutput]
    texts: list[str]
    summary: dict[str, Any]
    plan: Plan
    memory: MemoryBudget | None
    trace: Any = None
    timeline: Any = None
    prompts: list[Prompt] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# Inputs


def resolve_model_dir(model: str | None) -> Path:
    """Return the checkpoint folder for ``--model`` (None or ``tiny`` is the embedded model)."""
    if model is None or model == EMBEDDED_MODEL_NAME:
        return EMBEDDED_MODEL_DIR
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError("checkpoint folder has no config.json", field="model", value=model)
        return path
    if (SPEC_DIR / f"{model}.json").is_file():
        raise InputError(f"'{model}' is a shipped spec without weights; pass a checkpoint folder to generate",
                         field="model", value=model, accepted=f"{EMBEDDED_MODEL_NAME} or a checkpoint folder")
    raise InputError("model not found", field="model", value=model,
                     accepted=f"{EMBEDDED_MODEL_NAME} or a checkpoint folder with config.json and safetensors")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cuda", "cpu"):
        raise InputError("unknown device", field="device", value=name, accepted="cuda, cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine", field="device", value=name, accepted="cpu")
    return torch.device(name)


def default_intra_op_threads(device: torch.device) -> int | None:
    """Return the PyTorch intra-op thread count to use on ``device``, or None to keep PyTorch's.

    On the CPU device the accelerator lane and the CPU lane share the cores, and OpenMP
    teams of several threads spin against each other whenever the cores are busy, so each
    lane gets one thread.
    """
    return 1 if device.type == "cpu" else None


def device_memory_bytes(device: torch.device) -> int:
    """Memory of the accelerator: the CUDA device's, or the machine's RAM for the CPU device."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read prompts from JSON lines (``.jsonl`` or ``.jsonl.gz``): objects with ``prompt`` and an
    optional ``id`` or ``task_id`` (the HumanEval layout), or bare strings."""
    file = Path(path)
    if not file.is_file():
        raise InputError("prompts file not found", source=str(path))
    opener = gzip.open if file.suffix == ".gz" else open
    prompts = []
    with opener(file, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"invalid JSON: {error}", source=where) from None
            if isinstance(item, str):
                prompts.append(Prompt(str(len(prompts)), item))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                prompt_id = item.get("id", item.get("task_id", len(prompts)))
                prompts.append(Prompt(str(prompt_id), item["prompt"]))
            else:
                raise InputError("each line must be a string or an object with a string 'prompt'", source=where,
                                 field="prompt", value=type(item).__name__)
    if not prompts:
        raise InputError("prompts file has no prompts", source=str(path))
    return prompts


def load_model_spec(model_dir: Path) -> ModelSpec:
    name = EMBEDDED_MODEL_NAME if model_dir == EMBEDDED_MODEL_DIR else model_dir.resolve().name
    return spec_from_config(read_json(model_dir / "config.json", what="config"), name=name,
                            source=str(model_dir / "config.json"))


# ----------------------------------------------------------------------------------------
# Memory and slots


def context_sizes(prompt_lengths: Sequence[int], config: BlockDiffusionConfig) -> tuple[int, int]:
    """Return (KV cache positions, most tokens fed in one pass) over the prompts."""
    block = config.block_length
    max_context = max(math.ceil((n + config.gen_tokens) / block) * block for n in prompt_lengths)
    if config.kv_cache:
        batch = max(block, max((n // block) * block for n in prompt_lengths))
    else:
        batch = max_context
    return max_context, batch


def choose_slots(spec: ModelSpec, options: RunOptions, device: torch.device, max_context_tokens: int,
                 batch_tokens: int, plan: Plan | None = None) -> tuple[tuple[int, ...], MemoryBudget]:
    """Return the slot budget of every MoE layer and the memory budget it was checked against."""
    device_bytes = device_memory_bytes(device)
    budget_bytes = options.gpu_memory_bytes if options.gpu_memory_bytes is not None else device_bytes
    memory = plan_memory(spec, budget_bytes, max_context_tokens=max_context_tokens, batch_tokens=batch_tokens,
                         reserve_fraction=RESERVE_FRACTION, device_memory_bytes=device_bytes)
    fit = memory.slots_per_layer
    where = "--gpu-memory" if options.gpu_memory_bytes is not None else f"the {device.type} device's memory"
    num_layers = spec.num_moe_layers

    if plan is not None:
        pool_bytes = sum(plan.slot_budgets) * memory.expert_bytes
        if pool_bytes > memory.expert_pool_bytes:
            raise InputError(f"the plan's {sum(plan.slot_budgets)} slots need {format_bytes(pool_bytes)}, but "
                             f"{where} ({format_bytes(budget_bytes)}) leaves {format_bytes(memory.expert_pool_bytes)} "
                             "for expert slots", field="gpu_memory", value=budget_bytes,
                             accepted=f"at least {_budget_for(memory, pool_bytes)} bytes")
        return tuple(plan.slot_budgets), memory
    if options.policy == "cpu-experts":
        return (0,) * num_layers, memory
    if options.policy == "all-gpu":
        wanted, reason = spec.num_experts, "all-gpu keeps every expert on the accelerator"
    elif options.slots is not None:
        if not 0 <= options.slots <= spec.num_experts:
            raise InputError("slots per MoE layer outside the layer's experts", field="slots", value=options.slots,
                             accepted=f"0 to {spec.num_experts}")
        wanted, reason = options.slots, f"--slots {options.slots}"
    elif options.gpu_memory_bytes is not None:
        return (fit,) * num_layers, memory
    else:
        wanted = min(int(spec.num_experts * DEFAULT_SLOT_FRACTION), fit)
        return (wanted,) * num_layers, memory
    if wanted > fit:
        pool_bytes = wanted * num_layers * memory.expert_bytes
        raise InputError(
            f"{reason}: {wanted} slots in each of {num_layers} MoE layers need {format_bytes(pool_bytes)}, but "
            f"{where} ({format_bytes(budget_bytes)}) holds {fit} after the non-expert weights "
            f"({format_bytes(memory.non_expert_bytes)}), KV cache ({format_bytes(memory.kv_cache_bytes)}), "
            f"activations ({format_bytes(memory.activation_bytes)}) and reserve "
            f"({format_bytes(memory.reserve_bytes)})", field="gpu_memory", value=budget_bytes,
            accepted=f"at least {_budget_for(memory, pool_bytes)} bytes, or an offloading policy with fewer slots")
    return (wanted,) * num_layers, memory


def _budget_for(memory: MemoryBudget, pool_bytes: int) -> int:
    fixed = memory.non_expert_bytes + memory.kv_cache_bytes + memory.activation_bytes
    return math.ceil((fixed + pool_bytes) / (1.0 - RESERVE_FRACTION))


# ----------------------------------------------------------------------------------------
# Loading


def load_model(model_dir: Path):
    """Load the checkpoint with our model code, on the host, in the checkpoint's dtype."""
    import transformers

    from executor.model import LLaDA2MoeForCausalLM

    transformers.utils.logging.disable_progress_bar()
    dtype_argument = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = LLaDA2MoeForCausalLM.from_pretrained(str(model_dir), **{dtype_argument: "auto"})
    return model.eval()


def special_ids(spec: ModelSpec, tokenizer) -> tuple[int, int | None]:
    """Return (mask id, end-of-text id): the config's when it names them, else the tokenizer's."""
    mask = spec.config.get("mask_token_id", getattr(tokenizer, "mask_token_id", None))
    eos = spec.config.get("eos_token_id", getattr(tokenizer, "eos_token_id", None))
    if isinstance(eos, list):
        eos = eos[0]
    if mask is None:
        mask = spec.mask_token_id
    return int(mask), (int(eos) if eos is not None else None)


# ----------------------------------------------------------------------------------------
# The run


def run_generation(options: RunOptions, prompts: Sequence[Prompt], config: BlockDiffusionConfig, *,
                   trace_out: str | None = None, timeline_out: str | None = None,
                   on_block: Callable[[int, int], None] | None = None, model=None, tokenizer=None) -> RunResult:
    """Generate for every prompt under one plan and return texts, summary and records.

    ``on_block(blocks_done, committed_tokens)`` is called after every block. ``model`` and
    ``tokenizer`` skip loading (tests reuse one model across runs).
    """
    if not prompts:
        raise InputError("no prompts given", field="prompt")
    if options.policy not in RUN_POLICIES and options.plan_path is None:
        raise InputError("unknown or not runnable policy", field="policy", value=options.policy,
                         accepted=", ".join(RUN_POLICIES) + " (or --plan PLAN.json)")
    model_dir = resolve_model_dir(options.model)
    spec = load_model_spec(model_dir)
    device = resolve_device(options.device)
    if options.cpu_threads < 1:
        raise InputError("must be at least 1", field="cpu_threads", value=options.cpu_threads)

    # Check the plan and the memory budget before loading any weight.
    given_plan = None
    if options.plan_path is not None:
        given_plan = load_plan(options.plan_path)
        check_plan_matches_spec(given_plan, spec, source=options.plan_path)
        if given_plan.policy == "oracle":
            logger.info("running an oracle plan: its placements are indexed by forward pass of the trace it "
                        "was made from")
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)
    prompt_ids = [tokenizer.encode(p.text) for p in prompts]
    for prompt, ids in zip(prompts, prompt_ids):
        if not ids:
            raise InputError("the prompt is empty", field="prompt", value=prompt.id)
    max_context, batch_tokens = context_sizes([len(ids) for ids in prompt_ids], config)
    budgets, memory = choose_slots(spec, options, device, max_context, batch_tokens, given_plan)

    if model is None:
        model = load_model(model_dir)
    mask_id, eos_id = special_ids(spec, tokenizer)
    if given_plan is not None:
        plan = given_plan
    else:
        plan = _make_plan(options, spec, budgets, model, prompts, prompt_ids, config, device, mask_id, eos_id)

    generator = torch.Generator(device=device)
    generator.manual_seed(options.seed)
    with OffloadEngine(model, plan, spec, device=device, pin_memory=options.pin_memory,
                       cpu_threads=options.cpu_threads, record_trace=True,
                       record_timeline=timeline_out is not None) as engine:
        outputs, elapsed_s = _generate_all(engine, prompt_ids, config, mask_id, eos_id, generator, on_block)
        summary = summarize(engine, outputs, elapsed_s)
        summary["model"] = spec.name
        summary["kv_cache"] = config.kv_cache
        trace = build_trace(engine, spec, config, [p.id for p in prompts],
                            extra={"policy": plan.policy, "device": str(device), "seed": options.seed,
                                   "pinned": engine.pinned,
                                   "output_tokens": [len(o.token_ids) for o in outputs]})
        timeline = build_timeline(engine, {"policy": plan.policy, "device": str(device), "model": spec.name,
                                           "pinned": engine.pinned}) if timeline_out else None
    if trace_out is not None:
        save_trace(trace, trace_out)
    if timeline_out is not None:
        save_timeline(timeline, timeline_out)
    texts = [tokenizer.decode(o.token_ids) for o in outputs]
    return RunResult(outputs, texts, summary, plan, memory, trace, timeline, list(prompts))


def _generate_all(engine, prompt_ids, config, mask_id, eos_id, generator, on_block):
    outputs: list[SequenceOutput] = []
    blocks_done = 0
    committed_before = 0
    start = time.perf_counter()
    for sequence, ids in enumerate(prompt_ids):
        def block_done(partial_output: SequenceOutput) -> None:
            nonlocal blocks_done
            blocks_done += 1
            if on_block is not None:
                on_block(blocks_done, committed_before + partial_output.committed_tokens)

        output = generate(engine, ids, config, mask_token_id=mask_id, eos_token_id=eos_id, sequence=sequence,
                          first_forward_index=len(engine.forwards), generator=generator, on_block=block_done)
        outputs.append(output)
        committed_before += output.committed_tokens
    return outputs, time.perf_counter() - start


def _make_plan(options: RunOptions, spec: ModelSpec, budgets, model, prompts, prompt_ids, config, device,
               mask_id, eos_id) -> Plan:
    """Build the plan of a named policy; ``static`` takes its hot sets from a profiling trace."""
    if options.policy != "static":
        return make_plan(options.policy, spec, slot_budget=list(budgets), interval=options.interval)
    if options.profile_trace is not None:
        profile = load_trace(options.profile_trace)
        check_trace_matches_spec(profile.metadata, spec, source=options.profile_trace)
    else:
        # Routing does not depend on the policy, so a tide run with the same slots records
        # the same routing as an all-gpu run would, within the memory budget.
        logger.info("static policy: profiling run under tide to choose the hot sets")
        profiling_plan = make_plan("tide", spec, slot_budget=list(budgets), interval=options.interval)
        with OffloadEngine(model, profiling_plan, spec, device=device, pin_memory=options.pin_memory,
                           cpu_threads=options.cpu_threads, record_trace=True, record_timeline=False) as engine:
            generator = torch.Generator(device=device)
            generator.manual_seed(options.seed)
            _generate_all(engine, prompt_ids, config, mask_id, eos_id, generator, None)
            profile = build_trace(engine, spec, config, [p.id for p in prompts])
    return make_plan("static", spec, slot_budget=list(budgets), interval=options.interval, profiling_trace=profile)
