import json

import pytest

from tide.cli.main import main
from tide.errors import InputError
from tide.spec import load_spec, spec_from_config

from helpers import SMALL_CONFIG


@pytest.mark.parametrize("name,total,active", [
    ("llada2-mini", 16.26e9, 1.43e9),
    ("llada2-flash", 102.9e9, 6.15e9),
    ("llada2.1-mini", 16.26e9, 1.43e9),
])
def test_published_parameter_counts(name, total, active):
    spec = load_spec(name)
    assert abs(spec.total_params - total) / total < 0.01
    assert abs(spec.active_params - active) / active < 0.01


def test_expert_bytes_and_flops_mini():
    spec = load_spec("llada2-mini")
    assert spec.expert_params == 3 * 2048 * 512
    assert spec.expert_bytes() == 3 * 2048 * 512 * 2
    assert spec.expert_bytes("float32") == 3 * 2048 * 512 * 4
    assert spec.expert_flops_per_token == 2 * 3 * 2048 * 512
    assert spec.moe_layers == tuple(range(1, 20))


def test_tiny_spec_offloads_for_real():
    spec = load_spec("tiny")
    assert spec.num_experts >= 16
    assert spec.top_k >= 2
    assert spec.num_shared_experts >= 1


def test_spec_from_checkpoint_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    spec = load_spec(tmp_path)
    assert spec.num_experts == 6
    assert load_spec(tmp_path / "config.json").config_hash == spec.config_hash


@pytest.mark.parametrize("change,field", [
    ({"num_experts_per_tok": 7}, "num_experts_per_tok"),
    ({"hidden_size": 17}, "hidden_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_experts": None}, "num_experts"),
    ({"mask_token_id": 64}, "mask_token_id"),
])
def test_bad_config_names_field(change, field):
    config = {**SMALL_CONFIG, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(InputError) as caught:
        spec_from_config(config, name="bad")
    assert f"'{field}'" in str(caught.value)


def test_spec_show_json_cli(capsys):
    assert main(["spec", "show", "llada2-flash", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(result["total_params"] - 102.9e9) / 102.9e9 < 0.01
    assert result["expert_bytes"] == 3 * 4096 * 1024 * 2


def test_spec_show_unknown_exits_2(capsys):
    assert main(["spec", "show", "no-such-model"]) == 2
    assert "not found" in capsys.readouterr().err
