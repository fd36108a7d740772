"""Numerical libraries run with a bounded number of threads where clipaudit runs them."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_info

from clipaudit.core.threads import THREADS_ENV, bounded_threads, thread_bound


def _max_threads() -> int:
    return max(p["num_threads"] for p in threadpool_info())


def test_the_bound_holds_inside_and_is_lifted_after(monkeypatch):
    import numpy as np
    import torch

    np.ones((4, 4)) @ np.ones((4, 4))  # BLAS loaded
    torch.set_num_threads(2)
    with bounded_threads(1) as n:
        assert n == 1 and _max_threads() == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(THREADS_ENV, "2")
    assert thread_bound() == 2
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(ValueError, match=THREADS_ENV):
        thread_bound()


def test_the_reduce_step_runs_with_one_thread_per_pool(tmp_path, monkeypatch):
    """The scikit-learn fits of the reduce step never start a BLAS/OpenMP thread per core."""
    import clipaudit.reduce.pipeline as pipeline
    from attacks.test_idia import img, write_samples
    from clipaudit.reduce import ReduceOptions, reduce_outputs

    seen = []
    real = pipeline._learned_scores

    def spy(*args, **kwargs):
        seen.append(_max_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_learned_scores", spy)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    layout = write_samples(tmp_path, [img("Ann", "Ann", "Ann"), img("Bob", "Bob", "Ann")])
    reduce_outputs(layout, ReduceOptions(attacks=("idia",)))
    assert seen == [1]
