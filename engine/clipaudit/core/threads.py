"""Bounded numerical threads.

OpenBLAS, OpenMP (scikit-learn's trees) and torch each start a thread per core by default.
Several of them in one process, or next to another busy process, oversubscribe the cores and
spin-wait (measured on a 2-core VM: the demo's reduce took 187 s with the default pools and
44 s with one thread each). clipaudit therefore runs its numerical work with a fixed, small
number of threads, so that no user needs ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from collections.abc import Iterator

#: environment variable that overrides the bound (a positive integer)
THREADS_ENV = "CLIPAUDIT_NUM_THREADS"


def thread_bound(default: int = 1) -> int:
    """The number of threads numerical libraries get: ``$CLIPAUDIT_NUM_THREADS`` or ``default``."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer") from None
    if n < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer")
    return n


#: modules whose import loads a thread pool of its own: SciPy's OpenBLAS (its L-BFGS-B, which
#: scikit-learn's logistic regression and MLP use, runs on it) and scikit-learn's OpenMP runtime
_POOLED_MODULES = ("numpy", "scipy.linalg", "scipy.optimize", "sklearn.utils._openmp_helpers")


def _load_thread_pools() -> None:
    """Import the libraries that bring thread pools, so the bound reaches them: threadpoolctl
    limits only the pools already loaded, and a pool loaded later keeps a thread per core
    (measured: SciPy's OpenBLAS, loaded by the first fit, spin-waited through 49 of the 82 s a
    demo reduce took beside two busy processes)."""
    import importlib

    for name in _POOLED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library that is not installed has no pool to bound
            pass


@contextmanager
def bounded_threads(n: int | None = None) -> Iterator[int]:
    """Run the block with at most ``n`` BLAS/OpenMP threads (threadpoolctl) and, where torch is
    already imported, ``n`` torch intra-op threads; restore both afterwards. ``None``: the
    bound of :func:`thread_bound`. Yields the bound."""
    from threadpoolctl import threadpool_limits

    _load_thread_pools()
    n = thread_bound() if n is None else n
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield n
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)
