"""Write the embedded default model: tide/data/models/tiny/, the `tiny` spec with seeded random weights.

The folder is an ordinary checkpoint in the published LLaDA2 layout (config.json,
model.safetensors, tokenizer_config.json for the byte-level tokenizer), loaded by the same
``from_pretrained`` code as any checkpoint, so trained weights can replace it later
without a code change.

Weights come from one seeded generator, drawn parameter by parameter in name order, so
the files do not depend on how a transformers version initialises modules. Matrices are
normal with std ``initializer_range`` (0.02) and norm weights are 1. Each router's expert
bias is normal with std 0.03, which makes some experts more popular than others, as in
trained models.

Usage: python scripts/make_embedded_model.py [--out FOLDER] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.model import LLaDA2MoeConfig, LLaDA2MoeForCausalLM  # noqa: E402
from executor.tokenizer import ByteTokenizer  # noqa: E402
from tide.io import write_atomic, write_text_atomic  # noqa: E402

SPEC_PATH = ROOT / "tide" / "data" / "specs" / "tiny.json"
DEFAULT_OUT = ROOT / "tide" / "data" / "models" / "tiny"
EXPERT_BIAS_STD = 0.03


def seeded_state_dict(config: LLaDA2MoeConfig, seed: int) -> dict[str, torch.Tensor]:
    names = sorted(LLaDA2MoeForCausalLM(config).state_dict().items())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in names:
        if name.endswith("expert_bias"):
            value = torch.randn(tensor.shape, generator=generator) * EXPERT_BIAS_STD
        elif name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            value = torch.ones(tensor.shape)
        else:
            value = torch.randn(tensor.shape, generator=generator) * config.initializer_range
        state[name] = value.to(torch.float32).contiguous()
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight generator (default 0)")
    args = parser.parse_args()

    config_json = json.loads(SPEC_PATH.read_text())
    config = LLaDA2MoeConfig(**config_json)
    state = seeded_state_dict(config, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # config.json is the shipped spec itself, so traces of this model carry the spec's hash.
    write_text_atomic(out / "config.json", json.dumps(config_json, indent=2) + "\n")
    # One metadata key only: safetensors writes several in no fixed order, and the file should
    # be the same bytes on every run.
    write_atomic(out / "model.safetensors", lambda temporary: save_file(state, temporary, metadata={"format": "pt"}))
    ByteTokenizer(config.eos_token_id, config.mask_token_id, config.pad_token_id).save(out)

    model, info = LLaDA2MoeForCausalLM.from_pretrained(str(out), output_loading_info=True)
    missing = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    if missing:
        raise SystemExit(f"the written checkpoint does not load cleanly: {missing}")
    num_params = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {num_params} parameters, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
