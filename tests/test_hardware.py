"""Hardware profiles: shipped figures, JSON round trip, rejections and the ``tide hw`` CLI."""

from __future__ import annotations

import copy
import json

import pytest

from tide.cli.main import main
from tide.errors import InputError
from tide.hardware import (
    CalibrationTable,
    HardwareProfile,
    HostLink,
    list_profiles,
    load_profile,
    save_profile,
)
from tide.ir import SCHEMA_VERSION

SHIPPED = ("h100-sxm", "h100-pcie", "h200", "a100-80g", "l40s", "rtx4090", "rtx5090", "b200", "gh200", "mi300x",
           "cpu-host")

# Dense bf16 TFLOP/s, device memory GB/s, memory GB and link name, from public datasheets.
DATASHEET = {
    "h100-sxm": (989, 3350, 80, "PCIe5 x16"),
    "h100-pcie": (756, 2000, 80, "PCIe5 x16"),
    "h200": (989, 4800, 141, "PCIe5 x16"),
    "a100-80g": (312, 2039, 80, "PCIe4 x16"),
    "l40s": (362, 864, 48, "PCIe4 x16"),
    "rtx4090": (165, 1008, 24, "PCIe4 x16"),
    "rtx5090": (210, 1792, 32, "PCIe5 x16"),
    "b200": (2250, 8000, 180, "PCIe5 x16"),
    "gh200": (989, 4900, 144, "NVLink-C2C"),
    "mi300x": (1307, 5300, 192, "PCIe5 x16"),
}


def test_list_profiles_has_shipped_names():
    assert sorted(SHIPPED) == list_profiles()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.provenance.kind == "datasheet"
    assert profile.tables == {}
    assert profile.shared_cores == (name == "cpu-host")
    link = profile.link
    for bandwidth in (link.h2d_pinned_bytes_per_s, link.d2h_pinned_bytes_per_s,
                      link.h2d_pageable_bytes_per_s, link.d2h_pageable_bytes_per_s):
        assert bandwidth <= link.datasheet_bytes_per_s


@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_shipped_gpu_figures_match_datasheet(name):
    tflops, hbm_gb_per_s, memory_gb, link_name = DATASHEET[name]
    profile = load_profile(name)
    assert profile.gpu.bf16_dense_flops == tflops * 1e12
    assert profile.gpu.hbm_bytes_per_s == hbm_gb_per_s * 1e9
    assert profile.gpu.memory_bytes == memory_gb * 1e9
    assert profile.gpu.bf16_accumulate == "fp32"
    assert profile.link.name == link_name


@pytest.mark.parametrize("name, pinned, datasheet", [
    ("h200", 51e9, 64e9),
    ("b200", 51e9, 64e9),
    ("a100-80g", 26e9, 32e9),
    ("rtx4090", 26e9, 32e9),
])
def test_pcie_links_use_realistic_copy_bandwidth(name, pinned, datasheet):
    link = load_profile(name).link
    assert link.h2d_pinned_bytes_per_s == pinned
    assert link.d2h_pinned_bytes_per_s == pinned
    assert link.h2d_pageable_bytes_per_s == pytest.approx(pinned / 3, rel=1e-3)
    assert link.d2h_pageable_bytes_per_s == pytest.approx(pinned / 3, rel=1e-3)
    assert link.datasheet_bytes_per_s == datasheet
    assert link.latency_s == 1e-5


def test_gh200_link_is_asymmetric():
    link = load_profile("gh200").link
    assert link.h2d_pinned_bytes_per_s == 415e9
    assert link.d2h_pinned_bytes_per_s == 170e9
    assert link.datasheet_bytes_per_s == 450e9


def test_load_profile_by_path(tmp_path):
    path = tmp_path / "mine.json"
    data = load_profile("l40s").to_json()
    data["name"] = "mine"
    path.write_text(json.dumps(data))
    assert load_profile(str(path)).name == "mine"


def _calibrated_profile() -> HardwareProfile:
    data = load_profile("rtx4090").to_json()
    data["name"] = "lab-4090"
    data["provenance"].update(kind="calibrated", source="tide calibrate", calibrated_at="2025-01-02T03:04:05Z",
                              host="lab1", device_names=["NVIDIA GeForce RTX 4090"],
                              library_versions={"torch": "2.5.1"}, threads=16)
    data["tables"] = {
        "attention": {"x_name": "tokens_x_context", "x": [1024, 4096], "seconds": [1e-4, 3e-4]},
        "cpu_experts": {"x_name": "tokens_per_expert", "x": [1, 2, 4], "seconds": [6e-4, 6.5e-4, 8e-4]},
    }
    return HardwareProfile.from_json(data, source="test")


def test_json_round_trip_keeps_profile(tmp_path):
    profile = _calibrated_profile()
    path = tmp_path / "profiles" / "lab.json"
    save_profile(profile, path)
    loaded = load_profile(str(path))
    assert loaded == profile
    assert loaded.tables["cpu_experts"].x == (1, 2, 4)
    assert loaded.provenance.library_versions == {"torch": "2.5.1"}
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert list(tmp_path.joinpath("profiles").iterdir()) == [path]


def test_unknown_name_lists_shipped_names():
    with pytest.raises(InputError) as info:
        load_profile("h300")
    message = str(info.value)
    assert "h300" in message
    for name in SHIPPED:
        assert name in message


def test_missing_path_names_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(InputError, match="not found") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_missing_field_is_named(tmp_path):
    data = load_profile("h200").to_json()
    del data["link"]["latency_s"]
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as info:
        load_profile(path)
    message = str(info.value)
    assert path in message
    assert "link.latency_s" in message
    assert "missing" in message


def test_unknown_field_is_named(tmp_path):
    data = load_profile("h200").to_json()
    data["gpu"]["fp8_flops"] = 1e15
    with pytest.raises(InputError, match="gpu.fp8_flops"):
        load_profile(_write(tmp_path, data))


@pytest.mark.parametrize("value", [0, -5e9, "fast", None])
def test_bad_bandwidth_rejected(tmp_path, value):
    data = load_profile("h200").to_json()
    data["gpu"]["hbm_bytes_per_s"] = value
    with pytest.raises(InputError) as info:
        load_profile(_write(tmp_path, data))
    message = str(info.value)
    assert "gpu.hbm_bytes_per_s" in message
    assert ("null" if value is None else repr(value)) in message
    assert "> 0" in message


@pytest.mark.parametrize("field", ["h2d_pinned_bytes_per_s", "d2h_pinned_bytes_per_s",
                                   "h2d_pageable_bytes_per_s", "d2h_pageable_bytes_per_s"])
def test_bandwidth_above_datasheet_rejected(tmp_path, field):
    data = load_profile("h200").to_json()
    data["link"][field] = 65e9  # the PCIe5 datasheet peak is 64 GB/s per direction
    with pytest.raises(InputError) as info:
        load_profile(_write(tmp_path, data))
    message = str(info.value)
    assert f"link.{field}" in message
    assert "datasheet" in message
    assert "6.4e+10" in message


def test_bandwidth_at_datasheet_accepted():
    link = load_profile("h200").link
    values = {name: getattr(link, name) for name in HostLink.__dataclass_fields__}
    values["h2d_pinned_bytes_per_s"] = values["datasheet_bytes_per_s"]
    assert HostLink(**values).h2d_pinned_bytes_per_s == 64e9


def test_bandwidth_above_datasheet_rejected_in_code():
    link = load_profile("h200").link
    values = {name: getattr(link, name) for name in HostLink.__dataclass_fields__}
    values["d2h_pinned_bytes_per_s"] = 1e12
    with pytest.raises(InputError, match="link.d2h_pinned_bytes_per_s"):
        HostLink(**values)


def test_unknown_provenance_kind_rejected(tmp_path):
    data = load_profile("h200").to_json()
    data["provenance"]["kind"] = "guessed"
    with pytest.raises(InputError) as info:
        load_profile(_write(tmp_path, data))
    message = str(info.value)
    assert "provenance.kind" in message
    assert "'guessed'" in message
    assert "datasheet, calibrated" in message


def test_calibrated_without_time_rejected(tmp_path):
    data = _calibrated_profile().to_json()
    data["provenance"]["calibrated_at"] = None
    with pytest.raises(InputError, match="provenance.calibrated_at"):
        load_profile(_write(tmp_path, data))


@pytest.mark.parametrize("key, value, field", [
    ("efficiency", {"gemm_flops": 0.7, "hbm": 0.8, "cpu_flops": 1.0, "cpu_memory": 1.5}, "efficiency.cpu_memory"),
    ("efficiency", {"gemm_flops": 0.7, "hbm": 0.8, "cpu_flops": 1.0}, "efficiency.cpu_memory"),
    ("op_overhead_s", {"gpu": 1e-5, "h2d": 0, "d2h": 0, "cpu": -1e-5}, "op_overhead_s.cpu"),
    ("op_overhead_s", {"gpu": 1e-5, "h2d": 0, "d2h": 0, "cpu": 0, "npu": 0}, "op_overhead_s.npu"),
    ("schema_version", 99, "schema_version"),
])
def test_bad_profile_field_rejected(tmp_path, key, value, field):
    data = load_profile("h200").to_json()
    data[key] = value
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        load_profile(_write(tmp_path, data))


@pytest.mark.parametrize("table, field", [
    ({"x_name": "tokens_x_context", "x": [4096, 1024], "seconds": [1e-4, 3e-4]}, "tables.attention.x[1]"),
    ({"x_name": "tokens_x_context", "x": [1024, 1024], "seconds": [1e-4, 3e-4]}, "tables.attention.x[1]"),
    ({"x_name": "tokens_x_context", "x": [1024, 4096], "seconds": [1e-4, 0]}, "tables.attention.seconds[1]"),
    ({"x_name": "tokens_x_context", "x": [1024, 4096], "seconds": [3e-4, 1e-4]}, "tables.attention.seconds[1]"),
    ({"x_name": "tokens_x_context", "x": [1024, 2048, 4096], "seconds": [1e-4, 3e-4, 3e-4]},
     "tables.attention.seconds[2]"),
    ({"x_name": "tokens_x_context", "x": [1024], "seconds": [1e-4]}, "tables.attention.x"),
    ({"x_name": "tokens_x_context", "x": [1024, 4096], "seconds": [1e-4]}, "tables.attention.seconds"),
    ({"x_name": "bytes", "x": [1024, 4096], "seconds": [1e-4, 3e-4]}, "tables.attention.x_name"),
    ({"x_name": "tokens_x_context", "x": [1024, 4096], "seconds": [1e-5, 3e-4]}, "tables.attention.seconds[0]"),
])
def test_bad_table_rejected(tmp_path, table, field):
    data = _calibrated_profile().to_json()
    data["tables"]["attention"] = table
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as info:
        load_profile(path)
    message = str(info.value)
    assert path in message
    assert f"'{field}'" in message


def test_table_for_unknown_kind_rejected(tmp_path):
    data = _calibrated_profile().to_json()
    data["tables"]["softmax"] = copy.deepcopy(data["tables"]["attention"])
    with pytest.raises(InputError) as info:
        load_profile(_write(tmp_path, data))
    message = str(info.value)
    assert "tables.softmax" in message
    assert "unknown op kind" in message


def test_table_rejects_decreasing_x_in_code():
    with pytest.raises(InputError, match="strictly increasing"):
        CalibrationTable(x_name="tokens", x=(2.0, 1.0), seconds=(1e-4, 2e-4))


def test_cli_hw_list(capsys):
    assert main(["hw", "list"]) == 0
    output = capsys.readouterr().out
    for name in SHIPPED:
        assert name in output
    assert "NVLink-C2C" in output
    assert "2x Intel Xeon Platinum 8480+" in output


def test_cli_hw_list_json(capsys):
    assert main(["hw", "list", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_name = {row["name"]: row for row in result["profiles"]}
    assert sorted(by_name) == sorted(SHIPPED)
    assert by_name["gh200"]["h2d_pinned_gb_per_s"] == 415
    assert by_name["h200"]["bf16_tflops"] == 989


def test_cli_hw_show_json(capsys):
    assert main(["hw", "show", "h200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["name"] == "h200"
    assert result["gpu"]["hbm_bytes_per_s"] == 4800e9
    assert result["link"]["h2d_pinned_bytes_per_s"] == 51e9
    assert HardwareProfile.from_json(result) == load_profile("h200")


def test_cli_hw_show_text(capsys):
    assert main(["hw", "show", "gh200"]) == 0
    output = capsys.readouterr().out
    assert "NVLink-C2C" in output
    assert "pinned h2d 415 GB/s, d2h 170 GB/s" in output


def test_cli_hw_show_unknown_exits_2(capsys):
    assert main(["hw", "show", "h300"]) == 2
    captured = capsys.readouterr()
    assert "unknown hardware profile" in captured.err
    assert "h200" in captured.err
    assert "Traceback" not in captured.err
