"""File helpers: atomic writes, so a failed run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from tide.errors import InputError


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` and move the result over ``path`` in one rename.

    The temporary file sits in the target's folder so the rename stays on one file system.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates the file with mode 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)

    write_atomic(path, write)


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Read a JSON file, raising InputError that names the file when it is missing or invalid."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what} file not found", source=str(path))
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"invalid JSON: {error}", source=str(path)) from None
