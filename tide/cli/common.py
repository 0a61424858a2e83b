"""Helpers shared by the subcommands: JSON output and progress bars."""

from __future__ import annotations

import json
import sys
from typing import Any

from tqdm import tqdm


def emit(result: dict[str, Any], human: str, as_json: bool) -> None:
    """Print the human-readable text, or the result as one JSON line when ``as_json``."""
    if as_json:
        print(json.dumps(result, sort_keys=False, default=_json_default))
    else:
        print(human)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__} as JSON")


def progress(total: int | None, description: str, unit: str = "it", disable: bool = False) -> tqdm:
    """Return a progress bar on standard error with a live rate."""
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=disable or not sys.stderr.isatty(), leave=False)


def add_json_flag(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line of output")


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """Format rows as a plain text table: numbers right-aligned, text left-aligned."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        aligned = [value.rjust(width) if numeric[i] else value.ljust(width)
                   for i, (value, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(aligned).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
