"""img2dataset's per-shard status files → the downloads/ parts and their counts (no download)."""

import os

import pyarrow as pa
import pyarrow.parquet as pq

from clipaudit.io.downloads import OTHER, collect_downloads, status_file
from clipaudit.io.outputs import OutputLayout
from clipaudit.contract.schemas import load_schema


def write_status(path, rows):
    cols = ["url", "key", "status", "error_message", "identity"]
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), path)


ROWS = [
    {"url": "http://h/a.jpg", "key": "000000", "status": "success", "identity": "Ann  Lee"},
    {"url": "http://h/b.jpg", "key": "000001", "status": "failed_to_download",
     "error_message": "HTTP Error 404: File not found", "identity": "Ann Lee"},
    {"url": "http://h/c.jpg", "key": "000002", "status": "failed_to_resize", "error_message": "Image decoding error",
     "identity": "Bo Chen"},
]


def test_status_rows_become_downloads_parts_with_counts(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"")
    write_status(tmp_path / "00000.parquet", ROWS)
    (tmp_path / "00001.tar").write_bytes(b"")  # no status file: not counted
    layout = OutputLayout(tmp_path / "out")
    block, per_shard = collect_downloads(layout, [str(shard), str(tmp_path / "00001.tar")], "identity")
    assert block == {"shards_with_status": 1, "urls": 3, "success": 1, "missing": 2,
                     "missing_by_status": {"failed_to_download": 1, "failed_to_resize": 1},
                     "missing_by_reason": {"HTTP Error 404: File not found": 1, "Image decoding error": 1}}
    assert per_shard == {str(shard): {"urls": 3, "missing": 2}}
    part = layout.download_part(str(shard))
    table = pq.read_table(part)
    assert table.schema.equals(load_schema("downloads"), check_metadata=False)
    assert table["identity"].to_pylist() == ["Ann Lee", "Ann Lee", "Bo Chen"]  # normalised like samples.identity
    assert table["shard"].to_pylist() == [str(shard)] * 3
    assert table["error"].to_pylist() == [None, "HTTP Error 404: File not found", "Image decoding error"]


def test_a_current_copy_is_kept_a_changed_source_is_copied_again_a_vanished_one_removed(tmp_path):
    shard, source = tmp_path / "00000.tar", tmp_path / "00000.parquet"
    shard.write_bytes(b"")
    write_status(source, ROWS)
    layout = OutputLayout(tmp_path / "out")
    collect_downloads(layout, [str(shard)], "identity")
    part = layout.download_part(str(shard))
    os.utime(part, ns=(1, 1))  # a rewrite would give it a new time
    collect_downloads(layout, [str(shard)], "identity")
    assert part.stat().st_mtime_ns == 1
    write_status(source, ROWS[:1])
    os.utime(source, ns=(10**18, 10**18))
    block, _ = collect_downloads(layout, [str(shard)], "identity")
    assert block["urls"] == 1 and pq.read_table(part).num_rows == 1
    source.unlink()
    assert collect_downloads(layout, [str(shard)], "identity") == (None, {})
    assert not part.exists()


def test_other_parquet_files_and_other_shard_names_are_not_status_files(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"")
    pq.write_table(pa.table({"key": ["a"], "whatever": [1]}), tmp_path / "00000.parquet")
    assert collect_downloads(OutputLayout(tmp_path / "out"), [str(shard)], "identity") == (None, {})
    assert status_file("s3://b/x/00003.tar") == "s3://b/x/00003.parquet" and status_file("a.tgz") is None


def test_many_reasons_are_capped_with_the_rest_summed(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"")
    rows = [{"url": f"http://h/{i}", "key": f"{i:06d}", "status": "failed_to_download",
             "error_message": f"reason {i % 60}"} for i in range(120)]
    write_status(tmp_path / "00000.parquet", rows)
    block, _ = collect_downloads(OutputLayout(tmp_path / "out"), [str(shard)], "identity")
    assert len(block["missing_by_reason"]) == 51 and block["missing_by_reason"][OTHER] == 20
    assert sum(block["missing_by_reason"].values()) == block["missing"] == 120


def test_status_files_on_object_storage_are_found_from_one_listing_per_folder(tmp_path, monkeypatch):
    """Shards on object storage: their status files are found from one listing of their folder,
    not a request per shard; a copy is kept while its source is unchanged and removed once it is gone."""
    import fsspec

    fs = fsspec.filesystem("memory")
    folder = "memory://inputs-downloads-test"
    for i in range(3):
        fs.pipe(f"{folder}/{i:05d}.tar", b"")
    with fs.open(f"{folder}/00001.parquet", "wb") as f:
        pq.write_table(pa.table({c: [r.get(c) for r in ROWS] for c in ["url", "key", "status", "error_message",
                                                                          "identity"]}), f)
    calls = {"find": 0, "info": 0}
    for name in calls:
        real = getattr(type(fs), name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(type(fs), name, counted)
    shards = [f"{folder}/{i:05d}.tar" for i in range(3)]
    layout = OutputLayout(tmp_path / "out")
    block, per_shard = collect_downloads(layout, shards, "identity")
    assert per_shard == {shards[1]: {"urls": 3, "missing": 2}} and block["missing"] == 2
    assert calls == {"find": 1, "info": 0}  # one listing, no request per shard
    part = layout.download_part(shards[1])
    assert pq.read_table(part).num_rows == 3
    os.utime(part, ns=(1, 1))
    collect_downloads(layout, shards, "identity")
    assert part.stat().st_mtime_ns == 1  # unchanged source: the copy is kept
    fs.rm(f"{folder}/00001.parquet")
    assert collect_downloads(layout, shards, "identity") == (None, {}) and not part.exists()
    fs.rm(folder, recursive=True)
