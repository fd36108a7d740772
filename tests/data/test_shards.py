from pathlib import Path

import pytest

from clipaudit.data.shards import ShardPatternError, expand_shards


def test_brace_range_keeps_zero_padding():
    assert expand_shards("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]


def test_brace_list_and_explicit_list_dedupe_in_order():
    assert expand_shards("a/{x,y}.tar") == ["a/x.tar", "a/y.tar"]
    assert expand_shards(["b.tar", "a.tar", "b.tar"]) == ["b.tar", "a.tar"]


def test_glob_sorted_and_must_match(tmp_path):
    for n in ("2.tar", "1.tar", "x.txt"):
        (tmp_path / n).write_bytes(b"")
    assert expand_shards(str(tmp_path / "*.tar")) == [str(tmp_path / "1.tar"), str(tmp_path / "2.tar")]
    with pytest.raises(ShardPatternError, match="no file matches"):
        expand_shards(str(tmp_path / "*.zip"))


def test_bad_braces():
    with pytest.raises(ShardPatternError):
        expand_shards("{5..1}.tar")
    with pytest.raises(ShardPatternError):
        expand_shards("{abc}.tar")


def test_urls_are_listed_as_given_and_need_their_backend(tmp_path):
    import pytest

    from clipaudit.data.urls import check_backend, is_url

    assert expand_shards("s3://bucket/laion/{00000..00001}.tar") == ["s3://bucket/laion/00000.tar",
                                                                   "s3://bucket/laion/00001.tar"]
    assert is_url("s3://b/x.tar") and is_url("hf://datasets/x/y.tar") and not is_url("file:///tmp/x.tar")
    check_backend("memory://x.tar")  # built into fsspec
    with pytest.raises(ShardPatternError, match="globs are not expanded for URLs"):
        expand_shards("s3://bucket/*.tar")
    with pytest.raises(ImportError, match="needs the fsspec backend for nosuchproto://|nosuchproto"):
        check_backend("nosuchproto://x.tar")


def test_memory_url_shard_reads_like_a_local_file(tmp_path):
    import fsspec
    from helpers import image_bytes, sample_files, write_tar

    from clipaudit.data.tar_reader import iter_tar_samples

    local = tmp_path / "a.tar"
    members = sample_files("k1", "Ann", image_bytes(seed=1)) + sample_files("k2", "Bob", image_bytes(seed=2))
    write_tar(local, members)
    data = local.read_bytes()
    fs = fsspec.filesystem("memory")
    fs.pipe("/clipaudit-test/a.tar", data)
    fs.pipe("/clipaudit-test/cut.tar", data[: len(data) // 2])
    as_url = [(s.key, s.files, s.error) for s in iter_tar_samples("memory://clipaudit-test/a.tar")]
    assert as_url == [(s.key, s.files, s.error) for s in iter_tar_samples(str(local))]
    assert [s.error for s in iter_tar_samples("memory://clipaudit-test/cut.tar")][-1] == "truncated_tar"
    assert [s.key for s in iter_tar_samples(f"file://{local}")] == ["k1", "k2"]


def test_a_url_shard_is_fetched_whole_to_scratch_and_removed_after(tmp_path):
    import fsspec

    from clipaudit.data.shards import fetched_shard

    data = bytes(range(256)) * 40_000  # 10 MB: more than one read
    fsspec.filesystem("memory").pipe("/clipaudit-fetch/a.tar", data)
    scratch = tmp_path / "scratch"
    with fetched_shard("memory://clipaudit-fetch/a.tar", None, scratch) as local:
        assert Path(local).parent == scratch and Path(local).read_bytes() == data
    assert list(scratch.iterdir()) == []
    with fetched_shard(f"file://{tmp_path}/x.tar", None, scratch) as local:  # a local shard: read where it is
        assert local == f"{tmp_path}/x.tar"
    with pytest.raises(FileNotFoundError), fetched_shard("memory://clipaudit-fetch/missing.tar", None, scratch):
        pass
    assert list(scratch.iterdir()) == []  # nothing half-copied stays
