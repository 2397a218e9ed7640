"""Every stored format of the project carries a version, and its reader refuses one it does not know: this module is
how they say so, naming the file and the version found."""

from __future__ import annotations

from pathlib import Path


class UnknownVersion(ValueError):
    """A stored file whose format version this code does not read; the message names the file and the version."""


def check_version(path: Path | str, what: str, found, expected: int) -> None:
    """Refuse a stored `what` (a lake table, a snapshot, a cycle record, ...) of another version than `expected`."""
    try:
        ok = int(found) == expected
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UnknownVersion(f"{path}: {what} format version {found!r} is not {expected}, the version this code reads")
