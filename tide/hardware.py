"""Hardware profiles: the accelerator, its link to the host, and the host CPU.

A profile comes either from datasheets (for planning on hardware one does not own) or
from calibration microbenchmarks on the machine at hand (for validation). A calibrated
profile may carry measured tables per op kind, which ``tide.costs.CostModel`` prefers
over the roofline figures.

Units: bytes, seconds, FLOP/s and bytes per second, all plain numbers in SI units.
Shipped datasheet profiles live in ``tide/data/hardware/NAME.json``.

Profiles are validated when they are built or loaded. In particular, no link bandwidth
(pinned or pageable, either direction) may exceed the link's theoretical peak
``datasheet_bytes_per_s``: simulators that assumed link bandwidth far above what real
PCIe delivers have been badly wrong, so such a profile is rejected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from tide.errors import InputError
from tide.io import read_json, write_text_atomic
from tide.ir import LANES, OP_LANES, SCHEMA_VERSION

PROFILE_DIR = Path(__file__).parent / "data" / "hardware"

ACCUMULATE_PRECISIONS = ("fp32", "fp16")
PROVENANCE_KINDS = ("datasheet", "calibrated")
EFFICIENCY_KEYS = ("gemm_flops", "hbm", "cpu_flops", "cpu_memory")

# Op kinds that do the work of individual experts. Their tables are indexed by the
# tokens of one expert, and the cost model sums one lookup per expert of the op.
EXPERT_KINDS = ("gpu_experts", "gpu_expert", "cpu_experts")
COPY_KINDS = ("expert_copy", "act_h2d", "act_d2h")

# The x axis that each op kind's calibration table uses.
TABLE_X_NAMES = {
    "embed": "tokens",
    "attention": "tokens_x_context",
    "dense_mlp": "tokens",
    "router": "tokens",
    "shared_expert": "tokens",
    "expert_copy": "bytes",
    "gpu_experts": "tokens_per_expert",
    "gpu_expert": "tokens_per_expert",
    "act_d2h": "bytes",
    "cpu_experts": "tokens_per_expert",
    "act_h2d": "bytes",
    "combine": "tokens",
    "head": "tokens",
}
assert set(TABLE_X_NAMES) == set(OP_LANES), "every op kind needs a table x axis"


# ----------------------------------------------------------------------------------------
# Validation helpers. Each error keeps its bare message in ``detail`` so that a loader can
# raise it again with the file name and the full field path.


def _invalid(message: str, field: str, value: Any = None, accepted: str | None = None) -> InputError:
    error = InputError(message, field=field, value=value, accepted=accepted)
    error.detail = message  # type: ignore[attr-defined]
    return error


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _null_note(value: Any) -> str:
    # InputError leaves out a value of None, so the message spells it out instead.
    return " (got null)" if value is None else ""


def _check_positive(value: Any, name: str, unit: str) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise _invalid("must be a positive finite number" + _null_note(value), name, value,
                       accepted=f"a number > 0 in {unit}")


def _check_non_negative(value: Any, name: str, unit: str) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise _invalid("must be a finite number that is not negative" + _null_note(value), name, value,
                       accepted=f"a number >= 0 in {unit}")


def _check_text(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _invalid("must be a non-empty string" + _null_note(value), name, value)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _invalid("is not a known value", name, value, accepted=", ".join(choices))


# ----------------------------------------------------------------------------------------
# Parts of a profile


@dataclass(frozen=True)
class GpuSpec:
    """The accelerator: memory size, dense bf16 peak and device memory bandwidth.

    ``bf16_dense_flops`` is the vendor's dense (not 2:4 sparse) bf16 tensor peak, and
    ``bf16_accumulate`` records the accumulate precision that figure assumes.
    ``hbm_bytes_per_s`` is the device memory bandwidth, HBM or GDDR.
    """

    name: str
    memory_bytes: float
    bf16_dense_flops: float
    bf16_accumulate: str
    hbm_bytes_per_s: float

    def __post_init__(self) -> None:
        _check_text(self.name, "gpu.name")
        _check_positive(self.memory_bytes, "gpu.memory_bytes", "bytes")
        _check_positive(self.bf16_dense_flops, "gpu.bf16_dense_flops", "FLOP/s")
        _check_choice(self.bf16_accumulate, "gpu.bf16_accumulate", ACCUMULATE_PRECISIONS)
        _check_positive(self.hbm_bytes_per_s, "gpu.hbm_bytes_per_s", "bytes/s")


_LINK_BANDWIDTHS = (
    "h2d_pinned_bytes_per_s",
    "d2h_pinned_bytes_per_s",
    "h2d_pageable_bytes_per_s",
    "d2h_pageable_bytes_per_s",
)


@dataclass(frozen=True)
class HostLink:
    """The link between host memory and the accelerator.

    The four bandwidths are what copies really reach, from pinned or pageable host
    memory, per direction. ``datasheet_bytes_per_s`` is the link's theoretical peak per
    direction, and none of the four may exceed it. ``latency_s`` is the fixed cost of
    one copy.
    """

    name: str
    h2d_pinned_bytes_per_s: float
    d2h_pinned_bytes_per_s: float
    h2d_pageable_bytes_per_s: float
    d2h_pageable_bytes_per_s: float
    latency_s: float
    datasheet_bytes_per_s: float

    def __post_init__(self) -> None:
        _check_text(self.name, "link.name")
        _check_positive(self.datasheet_bytes_per_s, "link.datasheet_bytes_per_s", "bytes/s")
        for name in _LINK_BANDWIDTHS:
            value = getattr(self, name)
            _check_positive(value, f"link.{name}", "bytes/s")
            if value > self.datasheet_bytes_per_s:
                raise _invalid(
                    f"exceeds the link's datasheet peak of {self.datasheet_bytes_per_s:.4g} bytes/s, "
                    "and no copy can be faster than the link",
                    f"link.{name}",
                    value,
                    accepted=f"a number in (0, {self.datasheet_bytes_per_s:.4g}]",
                )
        _check_non_negative(self.latency_s, "link.latency_s", "seconds")


@dataclass(frozen=True)
class CpuSpec:
    """The host CPU that runs expert MLPs for misses.

    ``expert_flops`` is an already sustained FLOP/s figure for small-batch expert MLPs on
    all ``cores``, not a peak. ``memory_bytes_per_s`` is the theoretical DRAM bandwidth
    over all sockets, and ``memory_bytes`` the host memory size.
    """

    name: str
    cores: int
    expert_flops: float
    memory_bytes_per_s: float
    memory_bytes: float

    def __post_init__(self) -> None:
        _check_text(self.name, "cpu.name")
        if not isinstance(self.cores, int) or isinstance(self.cores, bool) or self.cores < 1:
            raise _invalid("must be a positive integer", "cpu.cores", self.cores)
        _check_positive(self.expert_flops, "cpu.expert_flops", "FLOP/s")
        _check_positive(self.memory_bytes_per_s, "cpu.memory_bytes_per_s", "bytes/s")
        _check_positive(self.memory_bytes, "cpu.memory_bytes", "bytes")


@dataclass(frozen=True)
class Provenance:
    """Origin of a profile's figures.

    A ``datasheet`` profile names its sources in ``source``. A ``calibrated`` profile also
    records when and where it was measured: ``calibrated_at`` (ISO 8601 time), ``host``,
    ``device_names``, ``library_versions`` (e.g. torch) and the CPU ``threads`` used.
    """

    kind: str
    source: str
    calibrated_at: str | None = None
    host: str | None = None
    device_names: tuple[str, ...] = ()
    library_versions: Mapping[str, str] = field(default_factory=dict)
    threads: int | None = None

    def __post_init__(self) -> None:
        _check_choice(self.kind, "provenance.kind", PROVENANCE_KINDS)
        _check_text(self.source, "provenance.source")
        if self.kind == "calibrated":
            _check_text(self.calibrated_at, "provenance.calibrated_at")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise _invalid("must be a positive integer or null", "provenance.threads", self.threads)
        object.__setattr__(self, "device_names", tuple(str(name) for name in self.device_names))
        object.__setattr__(self, "library_versions",
                           MappingProxyType({str(k): str(v) for k, v in self.library_versions.items()}))


@dataclass(frozen=True)
class CalibrationTable:
    """Measured durations of one op kind as a function of its size ``x``.

    ``x_name`` names what x counts (see ``TABLE_X_NAMES``). ``seconds[i]`` is the measured
    duration at ``x[i]``. For expert kinds it is the duration of an op with one expert of
    ``x[i]`` tokens. Points are strictly increasing in x and non-decreasing in seconds,
    and the last two points must grow, because the cost model extrapolates past the
    largest x with the slope of the last two points.
    """

    x_name: str
    x: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", tuple(self.x))
        object.__setattr__(self, "seconds", tuple(self.seconds))
        _check_choice(self.x_name, "x_name", tuple(sorted(set(TABLE_X_NAMES.values()))))
        if len(self.x) < 2:
            raise _invalid("needs at least two points", "x", len(self.x))
        if len(self.seconds) != len(self.x):
            raise _invalid(f"needs one entry per x value ({len(self.x)})", "seconds", len(self.seconds))
        for i, (x, seconds) in enumerate(zip(self.x, self.seconds)):
            _check_positive(x, f"x[{i}]", self.x_name)
            _check_positive(seconds, f"seconds[{i}]", "seconds")
        for i in range(1, len(self.x)):
            if self.x[i] <= self.x[i - 1]:
                raise _invalid(f"must be greater than x[{i - 1}] = {self.x[i - 1]!r}, because x must be strictly increasing",
                               f"x[{i}]", self.x[i])
            if self.seconds[i] < self.seconds[i - 1]:
                raise _invalid(
                    f"is less than seconds[{i - 1}] = {self.seconds[i - 1]!r}, but a larger op cannot be faster, "
                    "so smooth the measurements first (e.g. with a running maximum)",
                    f"seconds[{i}]", self.seconds[i])
        if self.seconds[-1] <= self.seconds[-2]:
            raise _invalid(
                "must be greater than the point before it, because durations past the largest x "
                "grow with the slope of the last two points; measure up to a size where time grows",
                f"seconds[{len(self.seconds) - 1}]", self.seconds[-1])

    def to_json(self) -> dict[str, Any]:
        return {"x_name": self.x_name, "x": list(self.x), "seconds": list(self.seconds)}


# ----------------------------------------------------------------------------------------
# The profile


@dataclass(frozen=True)
class HardwareProfile:
    """One machine: accelerator, host link, host CPU and how far they reach their peaks.

    ``efficiency`` contains roofline factors in (0, 1]: ``gemm_flops`` and ``hbm`` scale the
    GPU peaks, ``cpu_flops`` scales ``cpu.expert_flops`` (already sustained, so shipped
    profiles use 1.0) and ``cpu_memory`` scales ``cpu.memory_bytes_per_s``.
    ``op_overhead_s`` is the fixed cost of one op on each lane (kernel launches, thread
    pool dispatch), added to every op on that lane. ``tables`` maps op kinds to measured
    durations. ``shared_cores`` is True when the accelerator lane and the CPU lane run on
    the same cores (a calibration on a CPU-only machine), so they cannot run in parallel.
    """

    name: str
    gpu: GpuSpec
    link: HostLink
    cpu: CpuSpec
    provenance: Provenance
    efficiency: Mapping[str, float]
    op_overhead_s: Mapping[str, float]
    tables: Mapping[str, CalibrationTable] = field(default_factory=dict)
    shared_cores: bool = False

    def __post_init__(self) -> None:
        _check_text(self.name, "name")
        self._validate_efficiency()
        self._validate_overheads()
        self._validate_tables()
        if not isinstance(self.shared_cores, bool):
            raise _invalid("must be true or false", "shared_cores", self.shared_cores)
        object.__setattr__(self, "efficiency", MappingProxyType(dict(self.efficiency)))
        object.__setattr__(self, "op_overhead_s", MappingProxyType(dict(self.op_overhead_s)))
        object.__setattr__(self, "tables", MappingProxyType(dict(self.tables)))

    def _validate_efficiency(self) -> None:
        for key in self.efficiency:
            if key not in EFFICIENCY_KEYS:
                raise _invalid("unknown efficiency factor", f"efficiency.{key}", key,
                               accepted=", ".join(EFFICIENCY_KEYS))
        for key in EFFICIENCY_KEYS:
            if key not in self.efficiency:
                raise _invalid("missing", f"efficiency.{key}", accepted="a number in (0, 1]")
            value = self.efficiency[key]
            if not _is_number(value) or not 0 < value <= 1:
                raise _invalid("must be a fraction of the peak", f"efficiency.{key}", value,
                               accepted="a number in (0, 1]")

    def _validate_overheads(self) -> None:
        for lane in self.op_overhead_s:
            if lane not in LANES:
                raise _invalid("unknown lane", f"op_overhead_s.{lane}", lane, accepted=", ".join(LANES))
        for lane in LANES:
            if lane not in self.op_overhead_s:
                raise _invalid("missing", f"op_overhead_s.{lane}", accepted="seconds >= 0 for each lane")
            _check_non_negative(self.op_overhead_s[lane], f"op_overhead_s.{lane}", "seconds")

    def _validate_tables(self) -> None:
        for kind, table in self.tables.items():
            if kind not in OP_LANES:
                raise _invalid("unknown op kind", f"tables.{kind}", kind, accepted=", ".join(OP_LANES))
            if not isinstance(table, CalibrationTable):
                raise _invalid("must be a CalibrationTable", f"tables.{kind}", type(table).__name__)
            expected = TABLE_X_NAMES[kind]
            if table.x_name != expected:
                raise _invalid(f"does not fit op kind {kind!r}", f"tables.{kind}.x_name", table.x_name,
                               accepted=expected)
            fixed = self.fixed_cost_s(kind)
            if table.seconds[0] < fixed:
                raise _invalid(
                    f"is below the fixed cost of one {kind} op ({fixed:.6g} s, the lane's op overhead"
                    + (" plus the link latency" if kind in COPY_KINDS else "")
                    + "), so lower that overhead or measure again",
                    f"tables.{kind}.seconds[0]", table.seconds[0])

    def fixed_cost_s(self, kind: str) -> float:
        """Return the cost of an op of this kind with nothing to do: the lane's overhead,
        plus the link latency for copies."""
        fixed = float(self.op_overhead_s[OP_LANES[kind]])
        if kind in COPY_KINDS:
            fixed += self.link.latency_s
        return fixed

    # --- JSON -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        provenance = self.provenance
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "gpu": _fields_of(self.gpu, GpuSpec),
            "link": _fields_of(self.link, HostLink),
            "cpu": _fields_of(self.cpu, CpuSpec),
            "efficiency": dict(self.efficiency),
            "op_overhead_s": dict(self.op_overhead_s),
            "shared_cores": self.shared_cores,
            "tables": {kind: table.to_json() for kind, table in self.tables.items()},
            "provenance": {
                "kind": provenance.kind,
                "source": provenance.source,
                "calibrated_at": provenance.calibrated_at,
                "host": provenance.host,
                "device_names": list(provenance.device_names),
                "library_versions": dict(provenance.library_versions),
                "threads": provenance.threads,
            },
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "profile") -> "HardwareProfile":
        """Build a profile from its JSON form, raising InputError that names ``source``,
        the field, the bad value and what is accepted."""
        try:
            return _profile_from_json(data)
        except InputError as error:
            raise InputError(getattr(error, "detail", str(error)), source=source, field=error.field,
                             value=error.value, accepted=error.accepted) from None


def _fields_of(part: Any, cls: type) -> dict[str, Any]:
    return {f.name: getattr(part, f.name) for f in dataclasses.fields(cls)}


# --- parsing JSON -----------------------------------------------------------------------

_TOP_LEVEL_REQUIRED = ("schema_version", "name", "gpu", "link", "cpu", "provenance", "efficiency", "op_overhead_s")
_TOP_LEVEL_OPTIONAL = ("tables", "shared_cores")
_PROVENANCE_REQUIRED = ("kind", "source")
_PROVENANCE_OPTIONAL = ("calibrated_at", "host", "device_names", "library_versions", "threads")


def _check_object(data: Any, name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(data, Mapping):
        raise _invalid("must be a JSON object", name or "(top level)", type(data).__name__)
    prefix = f"{name}." if name else ""
    for key in data:
        if key not in required and key not in optional:
            raise _invalid("unknown field", prefix + str(key), accepted=", ".join(required + optional))
    for key in required:
        if key not in data:
            raise _invalid("missing", prefix + key, accepted=f"an object with all of: {', '.join(required)}")


def _build_part(cls: type, data: Any, name: str) -> Any:
    fields = tuple(f.name for f in dataclasses.fields(cls))
    _check_object(data, name, fields)
    return cls(**{key: data[key] for key in fields})


def _profile_from_json(data: Any) -> HardwareProfile:
    _check_object(data, "", _TOP_LEVEL_REQUIRED, _TOP_LEVEL_OPTIONAL)
    if data["schema_version"] != SCHEMA_VERSION:
        raise _invalid("unsupported schema version", "schema_version", data["schema_version"],
                       accepted=str(SCHEMA_VERSION))

    provenance_data = data["provenance"]
    _check_object(provenance_data, "provenance", _PROVENANCE_REQUIRED, _PROVENANCE_OPTIONAL)
    device_names = provenance_data.get("device_names") or []
    library_versions = provenance_data.get("library_versions") or {}
    if not isinstance(device_names, list):
        raise _invalid("must be a list of strings", "provenance.device_names", device_names)
    if not isinstance(library_versions, Mapping):
        raise _invalid("must be an object of library name to version", "provenance.library_versions",
                       library_versions)
    provenance = Provenance(
        kind=provenance_data["kind"],
        source=provenance_data["source"],
        calibrated_at=provenance_data.get("calibrated_at"),
        host=provenance_data.get("host"),
        device_names=tuple(device_names),
        library_versions=library_versions,
        threads=provenance_data.get("threads"),
    )

    for name in ("efficiency", "op_overhead_s"):
        if not isinstance(data[name], Mapping):
            raise _invalid("must be a JSON object", name, type(data[name]).__name__)
    tables_data = data.get("tables", {})
    if not isinstance(tables_data, Mapping):
        raise _invalid("must be a JSON object of op kind to table", "tables", type(tables_data).__name__)
    tables = {}
    for kind, table_data in tables_data.items():
        tables[kind] = _table_from_json(table_data, f"tables.{kind}")

    return HardwareProfile(
        name=data["name"],
        gpu=_build_part(GpuSpec, data["gpu"], "gpu"),
        link=_build_part(HostLink, data["link"], "link"),
        cpu=_build_part(CpuSpec, data["cpu"], "cpu"),
        provenance=provenance,
        efficiency=data["efficiency"],
        op_overhead_s=data["op_overhead_s"],
        tables=tables,
        shared_cores=data.get("shared_cores", False),
    )


def _table_from_json(data: Any, name: str) -> CalibrationTable:
    _check_object(data, name, ("x_name", "x", "seconds"))
    for key in ("x", "seconds"):
        if not isinstance(data[key], list):
            raise _invalid("must be a list of numbers", f"{name}.{key}", data[key])
    try:
        return CalibrationTable(x_name=data["x_name"], x=tuple(data["x"]), seconds=tuple(data["seconds"]))
    except InputError as error:
        raise _invalid(error.detail, f"{name}.{error.field}", error.value, error.accepted) from None


# ----------------------------------------------------------------------------------------
# Loading and saving


def list_profiles() -> list[str]:
    """Return the names of the shipped profiles, sorted."""
    return sorted(path.stem for path in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | os.PathLike) -> HardwareProfile:
    """Load a shipped profile by name (see ``list_profiles``) or a profile JSON file by path.

    A shipped name wins over a file of the same name in the working directory.
    """
    text = os.fspath(name_or_path)
    shipped = PROFILE_DIR / f"{text}.json"
    if os.sep not in text and "/" not in text and shipped.is_file():
        path = shipped
    elif Path(text).is_file() or text.endswith(".json") or os.sep in text or "/" in text:
        path = Path(text)
    else:
        raise InputError("unknown hardware profile", value=text,
                         accepted=", ".join(list_profiles()) + ", or the path of a profile JSON file")
    return HardwareProfile.from_json(read_json(path, what="hardware profile"), source=str(path))


def save_profile(profile: HardwareProfile, path: str | os.PathLike) -> None:
    """Write a profile as JSON in one atomic rename."""
    write_text_atomic(path, json.dumps(profile.to_json(), indent=2) + "\n")
