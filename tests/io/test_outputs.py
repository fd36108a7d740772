import json
import os

import pyarrow as pa

from clipaudit.io.outputs import OutputLayout, PartWriter, atomic_write_json, atomic_write_table, part_name
from clipaudit.io.schemas import load_schema


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
    w = PartWriter(layout.sample_part(shard), schema)
    w.write({f.name: [0 if f.name == "position" else "x" if f.name in ("shard", "status") else None
                      for _ in range(rows)] for f in schema})
    return w


def test_part_invisible_until_commit_and_abort_leaves_nothing(tmp_path):
    layout = OutputLayout(tmp_path)
    layout.make_dirs()
    w = _write_part(layout, "s.tar", 3)
    assert not layout.sample_part("s.tar").exists()
    assert all(p.name.startswith(".") for p in layout.samples_dir.iterdir())
    w.abort()
    assert list(layout.samples_dir.iterdir()) == []


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
    atomic_write_json(layout.marker("s.tar"), {"shard": "s.tar", "rows": 3, "embedding_rows": None})
    part, marker, folder = str(layout.sample_part("s.tar")), str(layout.marker("s.tar")), str(layout.samples_dir)
    part_tmp = next(e[1] for e in events if e[0] == "replace" and e[2] == part)
    marker_tmp = next(e[1] for e in events if e[0] == "replace" and e[2] == marker)
    assert events == [("fsync", part_tmp), ("replace", part_tmp, part), ("fsync", folder),
                      ("fsync", marker_tmp), ("replace", marker_tmp, marker), ("fsync", folder)]
    assert layout.is_done("s.tar")


def test_tables_are_fsynced_before_rename(tmp_path, monkeypatch):
    events = _record_disk_events(monkeypatch)
    path = tmp_path.resolve() / "identities.parquet"
    atomic_write_table(path, pa.table({"a": [1]}))
    tmp = events[1][1]
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(path.parent))]
