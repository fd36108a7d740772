"""Every ``jobs/*.yaml`` is a job spec whose dry run passes on a fresh clone, offline; a definite
problem (a missing local file, an unknown zoo tag) stays an error."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import yaml

from clipaudit.cli import main
from clipaudit.data.urls import is_url

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_jobs_holds_only_job_specs():
    assert JOBS, "jobs/ holds no job spec"
    others = [p.name for p in (ROOT / "jobs").iterdir() if p.suffix != ".yaml"]
    assert others == [], f"jobs/ holds only job specs (*.yaml), found {others}"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: a dry run must not contact storage or a hub."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _expected_unchecked(job: Path) -> list[str]:
    """The spec keys whose values a dry run cannot check from here, read from the YAML itself."""
    raw = yaml.safe_load(job.read_text())
    keys = []
    pretrained = raw["model"].get("pretrained")
    if pretrained and (pretrained.startswith("hf-hub:") or not any(c in pretrained for c in "/.")):
        keys.append("model.pretrained")  # a hub repo or an OpenCLIP zoo tag (not a checkpoint path)
    shards = raw["data"]["shards"]
    if any(is_url(s) for s in ([shards] if isinstance(shards, str) else shards)):
        keys.append("data.shards")
    if is_url(raw["names"]):
        keys.append("names")
    return keys


@pytest.mark.parametrize("job", JOBS, ids=[p.name for p in JOBS])
def test_every_job_dry_runs_offline_and_lists_what_it_cannot_check(job, no_network, capsys):
    assert main(["run", str(job), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "valid" in out
    for item in ("shards:", "images:", "actors:", "GPUs:", "estimated time:"):
        assert any(line.startswith(item) for line in out.splitlines()), f"the plan has no {item!r} line:\n{out}"
    expected = _expected_unchecked(job)
    assert expected, f"{job.name}: expected inputs on object storage or a hub"
    listed = [line.strip().split(":", 1)[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == expected, out
    assert f"unchecked ({len(expected)})" in out
    assert not Path(yaml.safe_load(job.read_text())["output"]).exists()  # a dry run writes nothing


def _local_copy(tmp_path: Path, **changes) -> Path:
    """jobs/laion-identities.yaml with ``changes`` applied, written into tmp_path."""
    raw = yaml.safe_load((ROOT / "jobs" / "laion-identities.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    raw["output"] = str(tmp_path / "out")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    return job


def test_a_missing_local_names_file_is_still_an_error(tmp_path, no_network, capsys):
    job = _local_copy(tmp_path, names="data/names.txt")
    assert main(["run", str(job), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"names: file not found: {tmp_path / 'data' / 'names.txt'}" in err


def test_a_missing_local_shard_is_still_an_error(tmp_path, no_network, capsys):
    (tmp_path / "names.txt").write_text("Ann\n")
    (tmp_path / "a.tar").write_bytes(b"")
    job = _local_copy(tmp_path, names="names.txt", **{"data.shards": ["a.tar", "b.tar"]})
    assert main(["run", str(job), "--dry-run"]) == 2
    assert f"data.shards: file not found: {tmp_path / 'b.tar'}" in capsys.readouterr().err


def test_an_unknown_zoo_tag_is_an_error_found_offline(tmp_path, no_network, capsys):
    job = _local_copy(tmp_path, **{"model.pretrained": "laion9b_no_such_tag"})
    assert main(["run", str(job), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained: 'laion9b_no_such_tag' is not an OpenCLIP tag of ViT-L-14" in err
    assert "laion2b_s32b_b82k" in err  # the known tags are named


def test_a_missing_backend_passes_the_dry_run_but_not_the_run(tmp_path, no_network, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` fails as it does where it is not installed
    job = ROOT / "jobs" / "laion-identities.yaml"
    assert main(["run", str(job), "--dry-run"]) == 0
    assert "s3fs is not installed here (every worker node needs it)" in capsys.readouterr().out
    assert main(["run", str(job), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "names: reading s3:// URLs needs s3fs" in err
    assert not (tmp_path / "out").exists()
