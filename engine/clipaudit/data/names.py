"""The candidate name pool: one name per line, normalised like the identities; a local file
or a URL (``s3://``, ``gs://``, ``https://`` …) read through fsspec."""

from __future__ import annotations

from pathlib import Path

from .samples import normalize_name
from .shards import check_backend, is_url


class NamePoolError(ValueError):
    """The name pool file is empty or unreadable."""


def read_pool_bytes(path: str | Path) -> bytes:
    """The pool file's bytes. A URL that cannot be read (no backend, credentials or network;
    no such object) is a :class:`NamePoolError` naming it; a missing local file raises
    ``FileNotFoundError``."""
    if not is_url(str(path)):
        return Path(path).read_bytes()
    import fsspec

    try:
        check_backend(str(path))
        with fsspec.open(str(path), "rb") as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 — backends raise many types (ImportError, botocore, aiohttp, …)
        raise NamePoolError(f"names: cannot read {path}: {type(e).__name__}: {e}") from None


def load_name_pool(path: str | Path) -> list[str]:
    """One name per line; names are normalised, blank lines and repeats dropped."""
    try:
        lines = read_pool_bytes(path).decode("utf-8").splitlines()
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
