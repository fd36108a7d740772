import json
import os

import pyarrow as pa

from clipaudit.io.outputs import OutputLayout, PartWriter, part_name
from clipaudit.io.atomic import atomic_write_json, atomic_write_table
from clipaudit.contract.schemas import load_schema


def test_schemas_are_versioned_and_parse():
    for name in ("samples", "embeddings", "identities"):
        s = load_schema(name)
        assert s.metadata[b"clipaudit.schema"] == name.encode()
        assert int(s.metadata[b"clipaudit.schema_version"]) >= 1


def test_part_names_are_stable_and_distinct():
    assert part_name("/a/00001.tar") == part_name("/a/00001.tar")
    assert part_name("/a/00001.tar") != part_name("/b/00001.tar")
    assert part_name("s3://bucket/x y.tar").startswith("x_y-")


def _write_part(layout, shard, rows):
    schema = load_schema("samples")
    w = PartWriter(layout.sample_part(shard), schema, layout.tmp_dir)
    w.write({f.name: [0 if f.name == "position" else "x" if f.name in ("shard", "status") else None
                      for _ in range(rows)] for f in schema})
    return w


def test_part_invisible_until_commit_and_abort_leaves_nothing(tmp_path):
    layout = OutputLayout(tmp_path)
    layout.make_dirs()
    w = _write_part(layout, "s.tar", 3)
    assert not layout.sample_part("s.tar").exists()
    assert list(layout.samples_dir.iterdir()) == []  # the part being written is under _tmp/, not samples/
    assert ([p.name for p in layout.temp_files(layout.sample_part("s.tar"))]
            == [p.name for p in layout.tmp_dir.iterdir()])
    w.abort()
    assert list(layout.samples_dir.iterdir()) == [] and list(layout.tmp_dir.iterdir()) == []


def test_done_needs_marker_and_matching_part(tmp_path):
    layout = OutputLayout(tmp_path)
    layout.make_dirs()
    _write_part(layout, "s.tar", 3).commit()
    assert not layout.is_done("s.tar")  # part without marker: redo
    atomic_write_json(layout.marker("s.tar"), {"shard": "s.tar", "rows": 3, "embedding_rows": None})
    assert layout.is_done("s.tar")
    atomic_write_json(layout.marker("s.tar"), {"shard": "s.tar", "rows": 4, "embedding_rows": None})
    assert not layout.is_done("s.tar")  # wrong row count: redo
    atomic_write_json(layout.marker("s.tar"), {"shard": "s.tar", "rows": 3, "embedding_rows": 3})
    assert not layout.is_done("s.tar")  # embeddings part missing: redo
    layout.sample_part("s.tar").unlink()
    assert not layout.is_done("s.tar")
    assert json.loads(layout.marker("s.tar").read_text())["rows"] == 3


def _layouts(tmp_path, monkeypatch):
    """A local output folder and an output URL on fsspec's in-memory file system."""
    from clipaudit.io.outputs import output_layout

    monkeypatch.setenv("CLIPAUDIT_SCRATCH_DIR", str(tmp_path / "scratch"))
    return [OutputLayout(tmp_path / "local"), output_layout(f"memory://clipaudit-test/{tmp_path.name}")]


def _map_shards(layout, n: int, rows: int) -> list[str]:
    """``n`` shards mapped as the mapper maps them: a part of ``rows`` rows, then its marker."""
    layout.make_dirs()
    shards = [f"s{i}.tar" for i in range(n)]
    for s in shards:
        part = _write_part(layout, s, rows)
        part.commit(layout.store)
        layout.write_json(layout.marker(s), {"shard": s, "rows": rows, "embedding_rows": None, "bytes": part.bytes})
    return shards


def test_finished_shards_agree_with_is_done_in_every_case(tmp_path, monkeypatch):
    for layout in _layouts(tmp_path, monkeypatch):
        shards = _map_shards(layout, 6, 3)
        m = layout.read_marker
        layout.write_json(layout.marker("s1.tar"), {**m("s1.tar"), "bytes": m("s1.tar")["bytes"] + 1})  # another part
        layout.store.remove(layout.sample_part("s2.tar"))  # part gone
        layout.write_json(layout.marker("s3.tar"), {**m("s3.tar"), "embedding_rows": 3})  # embeddings missing
        layout.write_json(layout.marker("s4.tar"), {"shard": "s4.tar", "rows": 3, "embedding_rows": None})  # no sizes
        layout.write_json(layout.marker("s5.tar"), {"shard": "other.tar", "rows": 3})  # another shard's
        done = layout.finished(shards + ["never-mapped.tar"])
        assert sorted(done) == ["s0.tar", "s4.tar"], layout.where
        assert [s for s in shards if layout.is_done(s)] == ["s0.tar", "s4.tar"]
        assert done["s0.tar"] == layout.read_marker("s0.tar")
        layout.write_json(layout.marker("s4.tar"), {"shard": "s4.tar", "rows": 2, "embedding_rows": None})
        assert "s4.tar" not in layout.finished(shards) and not layout.is_done("s4.tar")  # rows read back


def test_finished_shards_on_a_store_take_three_listings_and_one_batched_read(tmp_path, monkeypatch):
    _, layout = _layouts(tmp_path, monkeypatch)
    shards = _map_shards(layout, 20, 2)
    fs = layout.store.fs
    calls: list[str] = []
    for name in ("find", "cat", "open", "info", "exists", "isfile"):  # (the memory store's cat reads file by file)
        real = getattr(fs, name)
        monkeypatch.setattr(fs, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1])
    assert sorted(layout.finished(shards)) == sorted(shards)
    assert sorted(calls) == ["cat", "find", "find", "find"]


def _record_disk_events(monkeypatch) -> list[tuple]:
    """(``fsync``, path) and (``replace``, source, target) in the order they happen."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_part_reaches_disk_before_its_marker(tmp_path, monkeypatch):
    layout = OutputLayout(tmp_path.resolve())  # /proc/self/fd names resolved paths
    layout.make_dirs()
    w = _write_part(layout, "s.tar", 3)
    events = _record_disk_events(monkeypatch)
    w.commit()
    atomic_write_json(layout.marker("s.tar"), {"shard": "s.tar", "rows": 3, "embedding_rows": None}, layout.tmp_dir)
    part, marker = str(layout.sample_part("s.tar")), str(layout.marker("s.tar"))
    part_tmp = next(e[1] for e in events if e[0] == "replace" and e[2] == part)
    marker_tmp = next(e[1] for e in events if e[0] == "replace" and e[2] == marker)
    assert events == [("fsync", part_tmp), ("replace", part_tmp, part), ("fsync", str(layout.samples_dir)),
                      ("fsync", marker_tmp), ("replace", marker_tmp, marker), ("fsync", str(layout.markers_dir))]
    assert part_tmp.startswith(str(layout.tmp_dir)) and marker_tmp.startswith(str(layout.tmp_dir))
    assert layout.is_done("s.tar")


def test_tables_are_fsynced_before_rename(tmp_path, monkeypatch):
    events = _record_disk_events(monkeypatch)
    path = tmp_path.resolve() / "identities.parquet"
    atomic_write_table(path, pa.table({"a": [1]}))
    tmp = events[1][1]
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(path.parent))]


def test_readers_see_exactly_the_committed_rows(small_audit, tmp_path):
    """pandas, polars, pyarrow.dataset and DuckDB read samples/, embeddings/ and sample_scores/ as
    they are, with markers, the name state (.npy parts) and a killed writer's temp files present."""
    import shutil

    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    shutil.copytree(small_audit, out)
    layout = OutputLayout(out)
    assert list(layout.markers_dir.glob("*.done.json")) and list(layout.state_dir.rglob("part-*.npy"))
    # a writer killed mid-part: batches written, never committed (the next run removes these)
    for folder in ("samples", "embeddings", "sample_scores"):
        table = pq.read_table(next((out / folder).glob("*.parquet")))
        w = PartWriter(out / folder / "00002-killed.parquet", table.schema, layout.tmp_dir)
        w.write(table.slice(0, 3).to_pydict())
    (layout.tmp_dir / "samples.00003-killed.parquet.tmp-0badf00d").write_bytes(b"PAR1 half a part")
    assert len(list(layout.tmp_dir.iterdir())) == 4

    markers = [json.loads(m.read_text()) for m in layout.markers_dir.glob("*.done.json")]
    committed = {"samples": sum(m["rows"] for m in markers), "embeddings": sum(m["embedding_rows"] for m in markers),
                 "sample_scores": sum(m["ok"] for m in markers)}
    assert committed == {"samples": 50, "embeddings": 48, "sample_scores": 48}
    for folder, n in committed.items():
        parts = sorted((out / folder).glob("*.parquet"))
        expected = sorted(zip(*(pq.read_table(parts).column(c).to_pylist() for c in ("shard", "position"))))
        assert len(expected) == n
        d = str(out / folder)
        read = {
            "pandas": pd.read_parquet(d, columns=["shard", "position"]),
            "polars": pl.read_parquet(f"{d}/*.parquet", columns=["shard", "position"]).to_pandas(),
            "pyarrow.dataset": ds.dataset(d, format="parquet").to_table(columns=["shard", "position"]).to_pandas(),
            "duckdb": duckdb.sql(f"SELECT shard, position FROM read_parquet('{d}/*')").df(),
        }
        for reader, df in read.items():
            got = sorted(zip(df["shard"], df["position"].astype(int)))
            assert got == expected, f"{reader} on {folder}/: {len(got)} rows, expected {n}"
