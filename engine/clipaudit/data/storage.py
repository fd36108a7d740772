"""Object storage through fsspec: the job's ``data.storage_options``, opening URLs with them,
and checking remote inputs before a run.

``data.storage_options`` is a mapping passed to fsspec for every URL the job reads or writes
(shards, names, labels, controls, img2dataset status files, an output on object storage), e.g.
``{endpoint_url: …, key: …, secret: …}`` for s3fs, or one such mapping per protocol
(``{s3: {…}, gs: {…}}``, see :func:`options_for`). A string value may hold ``${VAR}``
references, replaced by the environment variable's value in the process that opens the URL
(the Ray executor resolves them on the driver and hands the values to its actors), so secrets
need not sit in the job file. Files the spec is written into (``_job.json``, ``manifest.json``) hold
:func:`redact_options`'s copy: a value
under a secret-like key (key, secret, token, password, …) becomes ``***`` unless it is only a
``${VAR}`` reference.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from typing import Any
from collections.abc import Iterable, Mapping

from clipaudit.core.errors import ClipauditError
from clipaudit.data.urls import check_backend, is_url, protocol

#: keys whose values are credentials (matched case-insensitively anywhere in the key)
SECRET_KEY = re.compile(r"key|secret|token|passw|credential|signature", re.IGNORECASE)
REDACTED = "***"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: protocols whose folders can be listed (one request per 1,000 objects instead of one per object)
_LISTABLE = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "file"}


class StorageError(ClipauditError, OSError):
    """A URL input that cannot be read: missing object, no permission, unreachable endpoint,
    or storage options that cannot be resolved. The message names the URL."""


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def _is_reference(value: Any) -> bool:
    return isinstance(value, str) and _REF.fullmatch(value.strip()) is not None


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy for files: secret-like keys' values → ``***`` (``${VAR}`` references are kept)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        elif is_secret_key(str(k)) and v is not None and not _is_reference(v):
            out[k] = REDACTED
        else:
            out[k] = v
    return out


def secret_literals(options: Mapping[str, Any]) -> list[str]:
    """The literal (non-reference) string values under secret-like keys, at any depth."""
    out: list[str] = []
    for k, v in options.items():
        if isinstance(v, Mapping):
            out += secret_literals(v)
        elif is_secret_key(str(k)) and isinstance(v, str) and v and v != REDACTED and not _is_reference(v):
            out.append(v)
    return out


def redact_text(text: str, options: Mapping[str, Any]) -> str:
    """``text`` (the job file as written) with every literal secret of ``options`` → ``***``."""
    for secret in sorted(set(secret_literals(options)), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def resolve_options(options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None,
                    where: str = "data.storage_options") -> dict[str, Any]:
    """``options`` with every ``${VAR}`` replaced by the environment variable's value.

    Raises :class:`StorageError` for an unset variable and for a value redacted in a saved
    spec (``***``: the job file held the secret itself, which is never saved)."""
    import os

    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        here = f"{where}.{k}"
        if isinstance(v, Mapping):
            out[k] = resolve_options(v, env, here)
            continue
        if v == REDACTED:
            raise StorageError(f"{here}: the job file held this secret itself, and saved specs hold '***' instead; "
                               "write it as a ${VAR} reference to an environment variable")
        if isinstance(v, str):
            missing = [m.group(1) for m in _REF.finditer(v) if m.group(1) not in env]
            if missing:
                raise StorageError(f"{here}: environment variable {missing[0]} is not set")
            v = _REF.sub(lambda m: env[m.group(1)], v)
        out[k] = v
    return out


def _filesystem_class(name: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(name)
    except (ImportError, ValueError):
        return None


def _protocol_keys(options: Mapping[str, Any]) -> list[str]:
    import fsspec

    known = set(fsspec.available_protocols())
    return [k for k in options if str(k).lower() in known]


def check_options_shape(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``options`` is one mapping for every URL or one per protocol:
    a protocol's name beside other keys, or a protocol's entry that is not a mapping, would
    otherwise reach the backend as an unknown argument and be silently ignored."""
    protos = _protocol_keys(options)
    if not protos:
        return
    others = [k for k in options if k not in protos]
    if others:
        raise ValueError(f"storage_options: either one mapping for every URL, or one per protocol "
                         f"({{s3: {{...}}, gs: {{...}}}}); here the protocols {protos} sit beside {others}")
    bad = [k for k in protos if not (options[k] is None or isinstance(options[k], Mapping))]
    if bad:
        raise ValueError(f"storage_options.{bad[0]}: the options of one protocol, a mapping")


def _by_protocol(options: Mapping[str, Any]) -> bool:
    return bool(options) and len(_protocol_keys(options)) == len(options)


def _entry_for(url: str, options: Mapping[str, Any] | None) -> tuple[Mapping[str, Any], str]:
    """(options for ``url``, where they sit in the spec), see :func:`options_for`."""
    where = "data.storage_options"
    if not options or not _by_protocol(options):
        return options or {}, where
    proto = protocol(url)
    by_name = {str(k).lower(): k for k in options}
    key = by_name.get(proto)
    if key is None:  # another name of the URL's file system (gcs for gs://)
        cls = _filesystem_class(proto)
        key = next((k for name, k in by_name.items() if cls is not None and _filesystem_class(name) is cls), None)
    return ({}, where) if key is None else (options[key] or {}, f"{where}.{key}")


def options_for(url: str, options: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The storage options that apply to ``url``: the whole mapping, or, where every key is an
    fsspec protocol with a mapping under it (the shape of fsspec's own config files, e.g.
    ``{s3: {endpoint_url: …}, gs: {token: …}}``), the entry of the URL's protocol or of another
    name of the same file system (``gcs`` for ``gs://``), else none."""
    return _entry_for(url, options)[0]


def _resolved_for(url: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    entry, where = _entry_for(url, options)
    return resolve_options(entry, where=where)


def url_to_fs(url: str, options: Mapping[str, Any] | None = None):
    """(file system, path) for ``url`` with the job's storage options for it (backend checked first)."""
    import fsspec

    check_backend(url)
    return fsspec.core.url_to_fs(url, **_resolved_for(url, options))


def open_url(url: str, mode: str = "rb", options: Mapping[str, Any] | None = None, **kwargs: Any):
    """``fsspec.open`` of ``url`` with the job's storage options for it (use as a context manager)."""
    import fsspec

    check_backend(url)
    return fsspec.open(url, mode, **kwargs, **_resolved_for(url, options))


def describe_error(url: str, e: BaseException, access: str = "read") -> str:
    """What went wrong reading (or, ``access="write"``, writing) ``url``, in words: missing,
    refused, or unreachable."""
    detail = f"{type(e).__name__}: {e}"
    if isinstance(e, FileNotFoundError):
        return f"object not found: {url}"
    if isinstance(e, PermissionError):
        return (f"access denied to {url} (the credentials are wrong or lack {access} permission on the bucket; "
                f"see data.storage_options): {detail}")
    if _is_connection_error(e):
        return f"cannot reach the storage endpoint for {url} (is endpoint_url right, is the service up?): {detail}"
    return f"cannot {access} {url}: {detail}"


def _is_connection_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError",
                         "ServerDisconnectedError", "TimeoutError", "ClientConnectionError"})


def _etag(info: Mapping[str, Any]) -> str | None:
    tag = info.get("ETag") or info.get("etag") or info.get("e_tag")
    return str(tag).strip('"') if tag else None


def _entry(info: Mapping[str, Any]) -> dict[str, Any]:
    return {"bytes": info.get("size"), "etag": _etag(info)}


#: the last :func:`stat_urls` answer per URL in this process (the manifest records it)
_LAST_STAT: dict[str, dict[str, Any]] = {}


def stat_urls(urls: Iterable[str], options: Mapping[str, Any] | None = None, what: str = "data.shards"
              ) -> dict[str, dict[str, Any]]:
    """Size and ETag of every URL (``{url: {"bytes", "etag"}}``), listing each folder once
    where the store can list. Raises :class:`StorageError` naming the first URL that is
    missing, refused or unreachable (prefixed with ``what``)."""
    urls = [u for u in urls if is_url(u)]
    folders: dict[tuple[str, str], list[str]] = defaultdict(list)
    for u in urls:
        folders[(protocol(u), posixpath.dirname(u))].append(u)
    out: dict[str, dict[str, Any]] = {}
    for (proto, folder), group in folders.items():
        try:
            fs, _ = url_to_fs(group[0], options)
        except StorageError as e:
            raise StorageError(f"{what}: {e}") from None
        except ImportError as e:
            raise StorageError(f"{what}: {e}") from None
        listing: dict[str, Mapping[str, Any]] = {}
        if proto in _LISTABLE and len(group) > 1:
            try:
                fs.invalidate_cache(fs._strip_protocol(folder))
                listing = {fs._strip_protocol(i["name"]): i for i in fs.ls(fs._strip_protocol(folder), detail=True)}
            except FileNotFoundError:
                raise StorageError(f"{what}: object not found: {group[0]}") from None
            except Exception as e:  # noqa: BLE001 — backends raise many types (botocore, aiohttp, …)
                raise StorageError(f"{what}: {describe_error(folder, e)}") from None
        for u in group:
            info = listing.get(fs._strip_protocol(u))
            if info is None:
                try:
                    fs.invalidate_cache(fs._strip_protocol(u))
                    info = fs.info(fs._strip_protocol(u))
                except Exception as e:  # noqa: BLE001 — see above
                    raise StorageError(f"{what}: {describe_error(u, e)}") from None
            if info.get("type") == "directory":
                raise StorageError(f"{what}: object not found: {u} (a folder)")
            out[u] = _entry(info)
    _LAST_STAT.update(out)
    return out


def last_stat(url: str) -> dict[str, Any] | None:
    """What :func:`stat_urls` last found for ``url`` in this process, or None."""
    return _LAST_STAT.get(url)
