"""The candidate name pool: one name per line, normalised like the identities; a local file
or a URL (``s3://``, ``gs://``, ``https://`` …) read through fsspec."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Mapping

from clipaudit.core.errors import ClipauditError
from clipaudit.data.samples import normalize_name
from clipaudit.data.urls import is_url
from clipaudit.data.storage import describe_error, open_url


class NamePoolError(ClipauditError, ValueError):
    """The name pool file is empty or unreadable."""


def read_pool_bytes(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The pool file's bytes (a URL opened with the job's ``data.storage_options``). A URL that
    cannot be read (no backend, credentials or network; no such object) is a
    :class:`NamePoolError` naming it; a missing local file raises ``FileNotFoundError``."""
    if not is_url(str(path)):
        return Path(path).read_bytes()

    try:
        with open_url(str(path), "rb", storage_options) as f:
            return f.read()
    except ImportError as e:
        raise NamePoolError(f"names: {e}") from None
    except Exception as e:  # noqa: BLE001 — backends raise many types (botocore, aiohttp, …)
        raise NamePoolError(f"names: {describe_error(str(path), e)}") from None


def load_name_pool(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """One name per line; names are normalised, blank lines and repeats dropped."""
    try:
        lines = read_pool_bytes(path, storage_options).decode("utf-8").splitlines()
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
