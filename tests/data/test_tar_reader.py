import tarfile
from pathlib import Path

from helpers import image_bytes, sample_files, write_tar

from clipaudit.data.tar_reader import iter_tar_samples, split_member_name


def _members(n: int) -> list:
    out = []
    for i in range(n):
        out += sample_files(f"{i:09d}", f"Person {i}", image_bytes(seed=i), caption=f"caption {i}")
    return out


def test_split_member_name_follows_webdataset():
    assert split_member_name("000000012.jpg") == ("000000012", "jpg")
    assert split_member_name("dir/abc.seg.JPG") == ("dir/abc", "seg.jpg")
    assert split_member_name("noext") == ("noext", "")


def test_groups_consecutive_files_into_samples(tmp_path: Path):
    shard = write_tar(tmp_path / "a.tar", _members(5))
    samples = list(iter_tar_samples(shard))
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [s.position for s in samples] == list(range(5))
    assert all(s.error is None and set(s.files) == {"jpg", "json", "txt"} for s in samples)


def test_repeated_key_is_an_error_sample(tmp_path: Path):
    m = _members(2) + sample_files("000000000", "Person 0", image_bytes())
    samples = list(iter_tar_samples(write_tar(tmp_path / "d.tar", m)))
    assert len(samples) == 3
    assert samples[2].key == "000000000" and samples[2].error == "duplicate_key" and samples[2].position == 2
    # the same extension twice in a row for one key is also a repeat
    m2 = [("k.jpg", image_bytes()), ("k.jpg", image_bytes(seed=1))]
    s2 = list(iter_tar_samples(write_tar(tmp_path / "d2.tar", m2)))
    assert [s.error for s in s2] == [None, "duplicate_key"]


def test_truncated_tar_keeps_samples_before_the_cut(tmp_path: Path):
    path = write_tar(tmp_path / "full.tar", _members(6))
    full = path.read_bytes()
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    end_of_data = last.offset_data + (last.size + 511) // 512 * 512
    for cut in (len(full) // 2, len(full) // 2 + 300, last.offset + 100, end_of_data - 10, end_of_data):
        p = tmp_path / f"cut{cut}.tar"
        p.write_bytes(full[:cut])
        samples = list(iter_tar_samples(p))
        good = [s for s in samples if s.error is None]
        bad = [s for s in samples if s.error is not None]
        assert [s.error for s in bad] == ["truncated_tar"], cut
        assert all(set(s.files) == {"jpg", "json", "txt"} for s in good)
        assert [s.position for s in samples] == list(range(len(samples)))
        assert 1 <= len(good) <= 6 and len({s.key for s in samples}) == len(samples)


def test_not_a_tar_and_empty_file(tmp_path: Path):
    (tmp_path / "x.tar").write_bytes(b"this is not a tar file at all" * 40)
    (tmp_path / "e.tar").write_bytes(b"")
    assert [s.error for s in iter_tar_samples(tmp_path / "x.tar")] == ["not_a_tar"]
    assert [s.error for s in iter_tar_samples(tmp_path / "e.tar")] == ["empty_shard"]


def test_valid_empty_tar_is_one_empty_shard_row(tmp_path: Path):
    """img2dataset writes a well-formed empty tar when every download of a shard failed: it must
    not vanish from the audit."""
    rows = list(iter_tar_samples(write_tar(tmp_path / "empty.tar", [])))
    assert [(s.key, s.position, s.error) for s in rows] == [(None, 0, "empty_shard")]
    assert "no samples" in rows[0].detail


def test_dangerous_member_names_are_just_keys(tmp_path: Path):
    m = [("../../etc/evil.jpg", image_bytes()), ("../../etc/evil.json", b'{"identity": "X"}'),
         ("/abs/path.jpg", image_bytes())]
    samples = list(iter_tar_samples(write_tar(tmp_path / "evil.tar", m)))
    assert [s.key for s in samples] == ["../../etc/evil", "/abs/path"]
    assert not (tmp_path.parent.parent / "etc" / "evil.jpg").exists()


class _FailsOnceMidRead:
    """A file that raises EIO once, on the first large read past ``after`` bytes (a member's
    data, not a 512-byte header), then reads normally — like a network read that hiccups."""

    def __init__(self, f, after: int) -> None:
        self.f, self.after, self.failed = f, after, False

    def read(self, n=-1):
        if not self.failed and self.f.tell() > self.after and (n is None or n < 0 or n > tarfile.BLOCKSIZE):
            self.failed = True
            raise OSError(5, "Input/output error")
        return self.f.read(n)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _failing_open(after: int, calls: list):
    import contextlib

    @contextlib.contextmanager
    def open_shard(shard, storage_options=None):
        with open(shard, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
            calls.append(shard)
            yield (_FailsOnceMidRead(f, after) if len(calls) == 1 else f), size

    return open_shard


def test_io_error_mid_shard_is_raised_not_recorded_as_a_cut_tar(tmp_path: Path, monkeypatch):
    import pytest

    import clipaudit.data.tar_reader as tar_reader

    shard = write_tar(tmp_path / "a.tar", _members(10))
    monkeypatch.setattr(tar_reader, "open_shard", _failing_open(after=shard.stat().st_size // 2, calls=[]))
    seen = []
    with pytest.raises(OSError, match="Input/output error"):
        for s in iter_tar_samples(shard):
            seen.append(s)
    assert 0 < len(seen) < 10 and all(s.error is None for s in seen)  # what came before the failure is intact


def test_io_error_mid_shard_is_retried_and_rows_equal_a_clean_run(tmp_path: Path, tiny_model, monkeypatch):
    import pyarrow.parquet as pq

    import clipaudit.data.tar_reader as tar_reader
    from clipaudit.app.runner import run_job
    from clipaudit.spec import parse_spec

    shard = write_tar(tmp_path / "a.tar", _members(10))
    (tmp_path / "names.txt").write_text("".join(f"Person {i}\n" for i in range(10)))

    def run(out: str):
        spec = parse_spec({"model": {"name": str(tiny_model["config"]), "pretrained": str(tiny_model["checkpoint"]),
                                     "precision": "fp32"},
                           "data": {"shards": "a.tar"}, "names": "names.txt", "attacks": {"idia": {"top_k": 2}},
                           "compute": {"executor": "local", "batch_size": 2, "max_retries": 1}, "output": out},
                          tmp_path)
        report = run_job(spec, progress=False)
        return report, pq.read_table(tmp_path / out / "samples").to_pylist()

    clean_report, clean = run("clean")
    calls: list = []
    monkeypatch.setattr(tar_reader, "open_shard", _failing_open(after=shard.stat().st_size // 2, calls=calls))
    report, rows = run("flaky")
    assert len(calls) == 2  # the shard was read again after the I/O error
    assert report.ok and report.summary["errors"] == {} and len(rows) == 10
    assert rows == clean  # every column of every row
