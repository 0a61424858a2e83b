"""Install a trained checkpoint as the embedded default model and the ``tiny`` spec.

The embedded model folder's config.json is the shipped spec file itself, byte for byte, so
traces recorded with the embedded model carry the spec's hash.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from executor.model import LLaDA2MoeForCausalLM
from tide.io import write_text_atomic

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_MODEL_DIR = REPO_ROOT / "tide" / "data" / "models" / "tiny"
TINY_SPEC_PATH = REPO_ROOT / "tide" / "data" / "specs" / "tiny.json"

# config.json fields that describe the model; transformers' bookkeeping fields are left out.
SPEC_FIELDS = (
    "architectures", "eos_token_id", "first_k_dense_replace", "head_dim", "hidden_act", "hidden_size",
    "intermediate_size", "mask_token_id", "max_position_embeddings", "model_type", "moe_intermediate_size",
    "n_group", "num_attention_heads", "num_experts", "num_experts_per_tok", "num_hidden_layers",
    "num_key_value_heads", "num_shared_experts", "pad_token_id", "partial_rotary_factor", "rms_norm_eps",
    "rope_theta", "routed_scaling_factor", "score_function", "tie_word_embeddings", "topk_group",
    "use_qk_norm", "use_qkv_bias", "vocab_size",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def spec_config(model: LLaDA2MoeForCausalLM) -> dict:
    """Return the spec fields of ``model``'s config, sorted by name, with float32 weights."""
    config = model.config.to_dict()
    spec = {key: config[key] for key in SPEC_FIELDS if key in config}
    spec["architectures"] = ["LLaDA2MoeModelLM"]
    spec["model_type"] = "llada2_moe"
    spec["torch_dtype"] = "float32"
    return dict(sorted(spec.items()))


def install_embedded_model(source: Path, model_dir: Path = EMBEDDED_MODEL_DIR,
                           spec_path: Path = TINY_SPEC_PATH) -> dict:
    """Copy the checkpoint in ``source`` (with its tokenizer) to ``model_dir`` and rewrite the spec.

    Returns the spec written. The installed folder is loaded back with ``from_pretrained``
    and must load with no missing or unexpected tensors.
    """
    model = LLaDA2MoeForCausalLM.from_pretrained(str(source))
    spec = spec_config(model)
    text = json.dumps(spec, indent=2) + "\n"

    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in model_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    shutil.copyfile(source / "model.safetensors", model_dir / "model.safetensors")
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, model_dir / name)
    write_text_atomic(model_dir / "config.json", text)
    write_text_atomic(spec_path, text)

    _, info = LLaDA2MoeForCausalLM.from_pretrained(str(model_dir), output_loading_info=True)
    problems = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    if problems:
        raise RuntimeError(f"the installed checkpoint in {model_dir} does not load cleanly: {problems}")
    logger.info("installed %s as the embedded model in %s and the spec %s", source, model_dir, spec_path)
    return spec
