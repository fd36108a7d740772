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
