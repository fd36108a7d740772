"""`clipaudit bench --under-load` reduces copies of an audit alone and beside busy processes."""

import json

import pytest


def test_under_load_bench_reduces_a_copy_alone_and_beside_busy_processes(small_audit, tmp_path):
    from clipaudit.bench.reduce_load import run_load_bench

    before = sorted(p.relative_to(small_audit) for p in small_audit.rglob("*"))
    stamp = (small_audit / "identities.parquet").stat().st_mtime_ns
    r = run_load_bench(small_audit, busy=1, repeat=1)
    assert len(r["alone_runs_s"]) == len(r["loaded_runs_s"]) == 1 and r["busy_processes"] == 1
    # the ratio of the unrounded medians; the medians are printed rounded to 0.01 s
    assert r["ratio"] == pytest.approx(r["loaded_s"] / r["alone_s"], abs=0.02) and r["machine"]["cpu_cores"] >= 1
    # the audit itself is untouched: every run reduces a copy
    assert sorted(p.relative_to(small_audit) for p in small_audit.rglob("*")) == before
    assert (small_audit / "identities.parquet").stat().st_mtime_ns == stamp
    json.dumps(r)


def test_under_load_bench_refuses_a_folder_that_is_no_audit(tmp_path):
    import pytest

    from clipaudit.bench.reduce_load import run_load_bench

    with pytest.raises(FileNotFoundError, match="not an audit folder"):
        run_load_bench(tmp_path)
