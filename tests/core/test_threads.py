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
    from clipaudit.reduce import reduce_outputs
    from clipaudit.reduce.options import ReduceOptions

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


def test_pools_loaded_by_the_first_fit_are_bounded_too():
    """threadpoolctl limits only the pools loaded when it is called; SciPy's OpenBLAS and
    scikit-learn's OpenMP load with their first use. In a fresh process with numpy alone
    loaded, a fit inside the bound runs with one thread in every pool."""
    import ast
    import os
    import subprocess
    import sys

    code = (
        "import numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "from clipaudit.core.threads import bounded_threads\n"
        "with bounded_threads(1):\n"
        "    from sklearn.linear_model import LogisticRegression\n"
        "    from sklearn.ensemble import HistGradientBoostingClassifier\n"
        "    X = numpy.random.default_rng(0).normal(size=(50, 3)); y = X[:, 0] > 0\n"
        "    LogisticRegression().fit(X, y); HistGradientBoostingClassifier(max_iter=5).fit(X, y)\n"
        "    print(sorted({(p['internal_api'], p['num_threads']) for p in threadpool_info()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "", "OPENBLAS_NUM_THREADS": ""})
    assert out.returncode == 0, out.stderr
    pools = ast.literal_eval(out.stdout.strip())
    assert {api for api, _ in pools} >= {"openblas", "openmp"} and all(n == 1 for _, n in pools), pools
