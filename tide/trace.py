"""Traces: the recorded routing of a generation run, stored in one safetensors file.

Shape letters: N tokens over all forward passes, L MoE layers, K experts per token, F
forward passes.

File layout (safetensors):

* ``forwards``: int64 [F, 7], one row per forward pass with the columns of
  ``FORWARD_COLUMNS``; the kind is coded as its index in ``tide.ir.FORWARD_KINDS``.
* ``experts``: int16 [N, L, K], the top-k expert ids of every token fed to every MoE
  layer, forward passes one after another in row order.
* ``weights`` (optional): float32 [N, L, K], the routing weights.
* metadata ``tide_trace``: JSON with the format version, spec name and config hash,
  prompt ids, generation settings and tool version; metadata ``sha256``: a checksum of the
  tensor bytes, so a flipped bit is caught at load.

``TraceReader`` reads the forward table and single forward passes without loading the
rest; ``load_trace`` reads and checks everything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from tide import __version__
from tide.errors import InputError
from tide.io import write_atomic
from tide.ir import FORWARD_KINDS, ForwardInfo

TRACE_FORMAT_VERSION = 1
FORWARD_COLUMNS = ("sequence", "kind", "block", "step", "num_tokens", "context_tokens", "committed_tokens")


@dataclass(frozen=True)
class GenerationSettings:
    block_length: int = 32
    steps: int = 32
    threshold: float = 0.95
    temperature: float = 0.0
    kv_cache: bool = True
    gen_tokens: int = 0


@dataclass(frozen=True)
class TraceMetadata:
    spec_name: str
    spec_hash: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    prompt_ids: tuple[str, ...] = ()
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    source: str = "executor"  # "executor" for recorded runs, "synthetic" for generated ones
    format_version: int = TRACE_FORMAT_VERSION
    tool_version: str = __version__
    created_at: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt_ids"] = list(self.prompt_ids)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str) -> "TraceMetadata":
        try:
            version = data["format_version"]
            if version != TRACE_FORMAT_VERSION:
                raise InputError("unsupported trace format version", source=source, field="format_version",
                                 value=version, accepted=str(TRACE_FORMAT_VERSION))
            generation = GenerationSettings(**data.get("generation", {}))
            return cls(
                spec_name=str(data["spec_name"]),
                spec_hash=str(data["spec_hash"]),
                num_moe_layers=int(data["num_moe_layers"]),
                num_experts=int(data["num_experts"]),
                top_k=int(data["top_k"]),
                prompt_ids=tuple(str(p) for p in data.get("prompt_ids", ())),
                generation=generation,
                source=str(data.get("source", "executor")),
                format_version=version,
                tool_version=str(data.get("tool_version", "")),
                created_at=str(data.get("created_at", "")),
                extra=dict(data.get("extra", {})),
            )
        except KeyError as error:
            raise InputError("missing metadata field", source=source, field=str(error.args[0])) from None
        except TypeError as error:
            raise InputError(f"invalid metadata: {error}", source=source, field="generation") from None


@dataclass(frozen=True)
class Trace:
    """A whole trace in memory. ``routing(i)`` is the [T, L, K] expert ids of forward pass i."""

    metadata: TraceMetadata
    forwards: tuple[ForwardInfo, ...]
    experts: np.ndarray  # int16 [N, L, K]
    weights: np.ndarray | None = None  # float32 [N, L, K]

    def __post_init__(self) -> None:
        counts = np.array([f.num_tokens for f in self.forwards], dtype=np.int64)
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        object.__setattr__(self, "offsets", offsets)

    offsets: np.ndarray = field(init=False, repr=False, compare=False)

    @property
    def num_forwards(self) -> int:
        return len(self.forwards)

    def routing(self, index: int) -> np.ndarray:
        return self.experts[self.offsets[index]:self.offsets[index + 1]]

    def routing_weights(self, index: int) -> np.ndarray | None:
        if self.weights is None:
            return None
        return self.weights[self.offsets[index]:self.offsets[index + 1]]

    def __iter__(self) -> Iterator[tuple[ForwardInfo, np.ndarray]]:
        for i, forward in enumerate(self.forwards):
            yield forward, self.routing(i)

    def output_tokens(self) -> int:
        """Return the tokens the run returned, the count that tokens per second divides.

        A pass can commit more tokens than a sequence returns: the last block is decoded
        whole and the output is cut to ``gen_tokens`` and before end of text. The executor
        records each sequence's returned count under ``metadata.extra["output_tokens"]``.
        For a trace without it, each sequence counts min(committed tokens, ``gen_tokens``).
        """
        recorded = self.metadata.extra.get("output_tokens")
        if isinstance(recorded, list) and all(isinstance(n, int) and n >= 0 for n in recorded):
            return sum(recorded)
        committed: dict[int, int] = {}
        for forward in self.forwards:
            committed[forward.sequence] = committed.get(forward.sequence, 0) + forward.committed_tokens
        limit = self.metadata.generation.gen_tokens
        return sum(min(count, limit) if limit > 0 else count for count in committed.values())

    def equals(self, other: "Trace") -> bool:
        same_weights = (self.weights is None and other.weights is None) or (
            self.weights is not None and other.weights is not None and np.array_equal(self.weights, other.weights))
        return (self.metadata == other.metadata and self.forwards == other.forwards
                and np.array_equal(self.experts, other.experts) and same_weights)


def forwards_to_array(forwards: tuple[ForwardInfo, ...] | list[ForwardInfo]) -> np.ndarray:
    table = np.zeros((len(forwards), len(FORWARD_COLUMNS)), dtype=np.int64)
    for i, f in enumerate(forwards):
        table[i] = (f.sequence, FORWARD_KINDS.index(f.kind), f.block, f.step, f.num_tokens, f.context_tokens,
                    f.committed_tokens)
    return table


def _forwards_from_array(table: np.ndarray, source: str) -> tuple[ForwardInfo, ...]:
    if table.ndim != 2 or table.shape[1] != len(FORWARD_COLUMNS):
        raise InputError("invalid shape", source=source, field="forwards", value=list(table.shape),
                         accepted=f"[F, {len(FORWARD_COLUMNS)}]")
    forwards = []
    for i, row in enumerate(table.tolist()):
        sequence, kind, block, step, num_tokens, context, committed = row
        where = f"forward pass {i}"
        if not 0 <= kind < len(FORWARD_KINDS):
            raise InputError(f"{where}: invalid kind code", source=source, field="forwards.kind", value=kind,
                             accepted=", ".join(f"{n}={k}" for n, k in enumerate(FORWARD_KINDS)))
        if num_tokens < 1:
            raise InputError(f"{where}: a forward pass needs at least one token", source=source,
                             field="forwards.num_tokens", value=num_tokens)
        if context < num_tokens:
            raise InputError(f"{where}: context is shorter than the tokens fed", source=source,
                             field="forwards.context_tokens", value=context, accepted=f">= {num_tokens}")
        if sequence < 0 or committed < 0 or committed > num_tokens:
            raise InputError(f"{where}: invalid sequence or committed count", source=source,
                             field="forwards.committed_tokens", value=(sequence, committed))
        kind_name = FORWARD_KINDS[kind]
        if kind_name == "denoise" and (block < 0 or step < 0):
            raise InputError(f"{where}: a denoise pass needs a block and a step", source=source,
                             field="forwards.step", value=(block, step))
        forwards.append(ForwardInfo(index=i, kind=kind_name, sequence=sequence, block=block, step=step,
                                    num_tokens=num_tokens, context_tokens=context, committed_tokens=committed))
    return tuple(forwards)


def _checksum(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def validate_routing(experts: np.ndarray, metadata: TraceMetadata, forwards: tuple[ForwardInfo, ...],
                     source: str) -> None:
    """Raise InputError naming the forward pass, layer and field of the first bad routing entry."""
    expected = (sum(f.num_tokens for f in forwards), metadata.num_moe_layers, metadata.top_k)
    if experts.ndim != 3 or tuple(experts.shape) != expected:
        raise InputError("shape does not match the forward table and metadata", source=source, field="experts",
                         value=list(experts.shape), accepted=f"[N, L, K] = {list(expected)}")
    bad = (experts < 0) | (experts >= metadata.num_experts)
    if bad.any():
        _raise_at(np.argwhere(bad)[0], experts, forwards, source,
                  f"expert id out of range 0..{metadata.num_experts - 1}")
    if metadata.top_k > 1:
        ordered = np.sort(experts, axis=2)
        repeated = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
        if repeated.any():
            row, layer = np.argwhere(repeated)[0]
            _raise_at((row, layer, 0), experts, forwards, source, "a token lists the same expert twice")


def _raise_at(position, experts: np.ndarray, forwards: tuple[ForwardInfo, ...], source: str, message: str) -> None:
    row, layer = int(position[0]), int(position[1])
    start = 0
    for forward in forwards:
        if row < start + forward.num_tokens:
            raise InputError(f"forward pass {forward.index}, MoE layer {layer}, token {row - start}: {message}",
                             source=source, field="experts", value=experts[row, layer].tolist())
        start += forward.num_tokens
    raise AssertionError("row outside every forward pass")


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write a trace atomically: a crash leaves either the old file or the whole new one."""
    from safetensors.numpy import save_file

    validate_routing(np.asarray(trace.experts), trace.metadata, trace.forwards, str(path))
    arrays = {"forwards": forwards_to_array(trace.forwards), "experts": np.ascontiguousarray(trace.experts, np.int16)}
    if trace.weights is not None:
        arrays["weights"] = np.ascontiguousarray(trace.weights, np.float32)
    metadata = trace.metadata
    if not metadata.created_at:
        metadata = TraceMetadata(**{**asdict(metadata), "generation": metadata.generation,
                                    "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    header = {"tide_trace": json.dumps(metadata.to_json()), "sha256": _checksum(arrays)}

    def write(temporary: str) -> None:
        save_file(arrays, temporary, metadata=header)
        _sort_header_metadata(temporary)

    write_atomic(path, write)


def _sort_header_metadata(path: str) -> None:
    """Rewrite a safetensors file's header in place with its metadata keys sorted.

    safetensors 0.8 writes the metadata map in hash order, which changes from process to
    process, so without this the same trace would not always give the same bytes. The
    header is rewritten only when the sorted form fits in the same length, which keeps
    every data offset valid; JSON with the same content has that length in practice.
    """
    with open(path, "r+b") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            file.seek(8)
            file.write(text.ljust(size, b" "))


class TraceReader:
    """Lazy access to a trace file: metadata and the forward table now, routing on demand."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = str(path)
        if not Path(path).is_file():
            raise InputError("trace file not found", source=self.path)
        try:
            self._file = safe_open(self.path, framework="numpy")
            header = self._file.metadata() or {}
            names = set(self._file.keys())
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"not a readable safetensors trace ({error})", source=self.path) from None
        if "tide_trace" not in header:
            raise InputError("missing TIDE metadata", source=self.path, field="tide_trace")
        for name in ("forwards", "experts"):
            if name not in names:
                raise InputError("missing tensor", source=self.path, field=name)
        try:
            raw = json.loads(header["tide_trace"])
        except json.JSONDecodeError as error:
            raise InputError(f"invalid metadata JSON ({error})", source=self.path, field="tide_trace") from None
        self.metadata = TraceMetadata.from_json(raw, source=self.path)
        self.checksum = header.get("sha256", "")
        self.forwards = _forwards_from_array(self._tensor("forwards"), self.path)
        counts = np.array([f.num_tokens for f in self.forwards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.has_weights = "weights" in names

    def _tensor(self, name: str) -> np.ndarray:
        try:
            return self._file.get_tensor(name)
        except Exception as error:
            raise InputError(f"tensor cannot be read ({error})", source=self.path, field=name) from None

    def routing(self, index: int) -> np.ndarray:
        """Return the [T, L, K] expert ids of one forward pass, read from disk."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        try:
            return self._file.get_slice("experts")[start:end]
        except Exception as error:
            raise InputError(f"forward pass {index}: routing cannot be read ({error})", source=self.path,
                             field="experts") from None

    def load(self, verify: bool = True) -> Trace:
        arrays = {"forwards": self._tensor("forwards"), "experts": self._tensor("experts")}
        if self.has_weights:
            arrays["weights"] = self._tensor("weights")
        if verify and self.checksum and _checksum(arrays) != self.checksum:
            raise InputError("checksum mismatch: the file is corrupt", source=self.path, field="sha256")
        experts = arrays["experts"]
        if experts.dtype != np.int16:
            raise InputError("invalid dtype", source=self.path, field="experts", value=str(experts.dtype),
                             accepted="int16")
        validate_routing(experts, self.metadata, self.forwards, self.path)
        weights = arrays.get("weights")
        if weights is not None and weights.shape != experts.shape:
            raise InputError("shape does not match experts", source=self.path, field="weights",
                             value=list(weights.shape), accepted=str(list(experts.shape)))
        return Trace(self.metadata, self.forwards, experts, weights)


def load_trace(path: str | Path, verify: bool = True) -> Trace:
    """Read a whole trace and check every shape, id range and count."""
    return TraceReader(path).load(verify=verify)


def check_trace_matches_spec(metadata: TraceMetadata, spec, source: str = "trace") -> None:
    """Raise InputError when a trace was recorded for a model of another shape."""
    for field_name, trace_value, spec_value in (
        ("num_moe_layers", metadata.num_moe_layers, spec.num_moe_layers),
        ("num_experts", metadata.num_experts, spec.num_experts),
        ("top_k", metadata.top_k, spec.top_k),
    ):
        if trace_value != spec_value:
            raise InputError(f"trace was recorded for '{metadata.spec_name}' with {field_name}={trace_value}, "
                             f"but model '{spec.name}' has {field_name}={spec_value}", source=source,
                             field=field_name, accepted=f"a trace of a model with {field_name}={spec_value}, or the "
                             f"model the trace was recorded with ('{metadata.spec_name}')")
