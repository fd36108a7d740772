"""The one URL helper: whether a shard, output or file reference is a URL, its protocol, and
whether the fsspec backend it needs is installed."""

from __future__ import annotations

#: fsspec backends users most often need, by protocol (what to pip install)
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
             "az": "adlfs", "abfs": "adlfs"}


def is_url(shard: str) -> bool:
    return "://" in shard and not shard.startswith("file://")


def protocol(shard: str) -> str:
    return shard.split("://", 1)[0].lower()


def backend_package(url: str) -> str:
    """What to install to read ``url`` (its fsspec backend)."""
    proto = protocol(url)
    return _BACKENDS.get(proto, f"the fsspec backend for {proto}://")


def check_backend(shard: str) -> None:
    """Raise ImportError naming the package to install when a URL's fsspec backend is missing."""
    import fsspec

    proto = protocol(shard)
    try:
        fsspec.get_filesystem_class(proto)
        if proto in _BACKENDS:  # fsspec knows the class but imports its backend lazily
            __import__(_BACKENDS[proto])
    except (ImportError, ValueError) as e:
        hint = backend_package(shard)
        raise ImportError(f"reading {proto}:// URLs needs {hint} (pip install {hint}): {e}") from None
