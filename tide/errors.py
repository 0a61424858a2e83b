"""Errors raised for bad input, and the one place that formats their messages."""

from __future__ import annotations

from typing import Any


class TideError(Exception):
    """Base class of every error that TIDE raises on purpose."""


class InputError(TideError, ValueError):
    """A file, option or value that TIDE cannot accept.

    The message names where the input came from, the field, the bad value and what
    would be accepted, so the CLI can print it without a traceback.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        field: str | None = None,
        value: Any = None,
        accepted: str | None = None,
    ) -> None:
        self.source = source
        self.field = field
        self.value = value
        self.accepted = accepted
        parts = []
        if source:
            parts.append(f"{source}:")
        if field:
            parts.append(f"field '{field}':")
        parts.append(message)
        if value is not None:
            parts.append(f"(got {value!r})")
        text = " ".join(parts)
        if accepted:
            text += f"; accepted: {accepted}"
        super().__init__(text)


class SolverError(TideError, RuntimeError):
    """A mathematical program that failed, timed out or was infeasible."""
