"""Labels and controls name shards unambiguously: two img2dataset runs both write 00000.tar."""

import json

import pyarrow.parquet as pq
import pytest
from helpers import image_bytes, sample_files, write_tar

from clipaudit.data.labels import LabelsError, ShardMatcher, read_controls, read_labels


def test_matcher_takes_paths_urls_and_only_unambiguous_file_names(tmp_path):
    m = ShardMatcher(["/d/members/00000.tar", "/d/nonmembers/00000.tar", "/d/other/00007.tar", "s3://b/x/00009.tar"])
    assert m.match("/d/members/00000.tar", "labels") == "/d/members/00000.tar"
    assert m.match("/d/members/../nonmembers/00000.tar", "labels") == "/d/nonmembers/00000.tar"
    assert m.match("00007.tar", "labels") == "/d/other/00007.tar"
    assert m.match("s3://b/x/00009.tar", "labels") == "s3://b/x/00009.tar"
    assert m.match("/elsewhere/00007.tar", "labels") is None  # a path must be one of the audited shards
    assert m.match("00001.tar", "labels") is None
    with pytest.raises(LabelsError, match="shard '00000.tar' is ambiguous.*members/00000.tar"):
        m.match("00000.tar", "labels")


def test_relative_shard_paths_resolve_against_the_files_folder_or_as_the_job_lists_them(tmp_path):
    m = ShardMatcher([str(tmp_path / "data" / "cands" / "00000.tar"), str(tmp_path / "other" / "00000.tar")])
    (tmp_path / "meta").mkdir()
    f = tmp_path / "meta" / "labels.csv"
    f.write_text("shard,key,member\n../data/cands/00000.tar,k1,true\ndata/cands/00000.tar,k2,false\n")
    labels = read_labels(f).matched(m)  # against the CSV's folder; then as the job file lists it
    assert labels.images == {(str(tmp_path / "data" / "cands" / "00000.tar"), "k1"): True,
                             (str(tmp_path / "data" / "cands" / "00000.tar"), "k2"): False}
    c = tmp_path / "meta" / "controls.csv"
    c.write_text("shard,key\nfile://" + str(tmp_path / "other" / "00000.tar") + ",k1\n")
    assert read_controls(c).matched(m).images == {(str(tmp_path / "other" / "00000.tar"), "k1")}


def test_label_files_that_contradict_or_match_nothing_are_errors(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("identity,member\nAnn,true\nAnn,false\n")
    with pytest.raises(LabelsError, match="line 3: 'Ann' is labelled both member and non-member"):
        read_labels(f)
    f.write_text("shard,key,member\n/elsewhere/00000.tar,k,true\n")
    with pytest.raises(LabelsError, match="none of the 1 image rows names an audited shard"):
        read_labels(f).matched(ShardMatcher(["/d/00000.tar"]))
    f.write_bytes("\ufeffidentity,member\nAnn,true\n".encode())  # Excel's "CSV UTF-8" (a byte-order mark)
    assert read_labels(f).identities == {"Ann": True}
    f.write_bytes("identity,member\nJos\xe9,true\n".encode("latin-1"))
    with pytest.raises(LabelsError, match="is not UTF-8"):
        read_labels(f)


@pytest.fixture
def two_runs(tmp_path, tiny_model):
    """members/00000.tar and nonmembers/00000.tar with the same keys, as two img2dataset runs write them."""
    for folder, who in (("members", "Ann Lee"), ("nonmembers", "Bob Stone")):
        (tmp_path / folder).mkdir()
        members = []
        for i in range(4):
            members += sample_files(f"{i:09d}", who, image_bytes(seed=hash(folder) % 1000 + i), caption=f"{who} {i}")
        write_tar(tmp_path / folder / "00000.tar", members)
    (tmp_path / "names.txt").write_text("Ann Lee\nBob Stone\nCy Doe\n")
    (tmp_path / "labels.csv").write_text("shard,key,member\n" + "".join(
        f"{folder}/00000.tar,{i:09d},{folder == 'members'}\n"
        for folder in ("members", "nonmembers") for i in range(4)))
    job = tmp_path / "job.yaml"
    job.write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: [members/00000.tar, nonmembers/00000.tar]}}
names: names.txt
labels: labels.csv
attacks: {{caption: {{}}}}
compute: {{executor: local, batch_size: 4}}
output: out
""")
    return tmp_path, job


def test_identically_named_shards_in_two_folders_keep_their_own_labels_and_controls(two_runs, capsys):
    from clipaudit.cli import main

    root, job = two_runs
    assert main(["run", str(job), "--no-progress"]) == 0
    m = json.loads((root / "out" / "metrics.json").read_text())["caption"]
    assert m["level"] == "image" and m["n_members"] == 4 and m["n_nonmembers"] == 4
    scores = pq.read_table(root / "out" / "sample_scores").to_pylist()
    controls = {(r["shard"].split("/")[-2], r["key"]) for r in scores if r["is_control"]}
    assert controls == {("nonmembers", f"{i:09d}") for i in range(4)}  # the labelled non-members, nothing else

    # a controls file naming one image of one folder makes only that image a control
    (root / "c.csv").write_text("shard,key\nnonmembers/00000.tar,000000002\n")
    assert main(["reduce", str(root / "out"), "--labels", str(root / "c.csv").replace("c.csv", "none.csv")]) == 2
    (root / "l2.csv").write_text("identity,member\nCy Doe,false\n")
    assert main(["reduce", str(root / "out"), "--labels", str(root / "l2.csv"), "--controls", str(root / "c.csv")]) == 0
    scores = pq.read_table(root / "out" / "sample_scores").to_pylist()
    assert {(r["shard"].split("/")[-2], r["key"]) for r in scores if r["is_control"]} == {("nonmembers", "000000002")}

    # a bare file name is ambiguous here: a clear error naming the shard, exit 2
    (root / "bare.csv").write_text("shard,key,member\n00000.tar,000000001,true\n")
    capsys.readouterr()
    assert main(["reduce", str(root / "out"), "--labels", str(root / "bare.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard '00000.tar' is ambiguous" in err[0]
