"""The candidate name pool: one name per line, normalised like the identities."""

from __future__ import annotations

from pathlib import Path

from .samples import normalize_name


class NamePoolError(ValueError):
    """The name pool file is empty or unreadable."""


def load_name_pool(path: str | Path) -> list[str]:
    """One name per line; names are normalised, blank lines and repeats dropped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise NamePoolError(f"names: {path} is not UTF-8 text: {e}") from None
    seen: dict[str, None] = {}
    for line in lines:
        name = normalize_name(line)
        if name:
            seen.setdefault(name, None)
    if not seen:
        raise NamePoolError(f"names: {path} holds no names")
    return list(seen)
