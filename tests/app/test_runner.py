"""The whole run path on the in-process executor: rows, errors, schemas, resume, reduce."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import image_bytes, sample_files, write_tar

from clipaudit.contract.schemas import load_schema
from clipaudit.app.runner import ResumeRefused, run_job
from clipaudit.app.jobs import load_job
from clipaudit.app.resolve import map_hash, numerics, pinned
from clipaudit.data.shards import expand_shards

NAMES = ["Ann Lee", "Bob Stone", "Cara Diaz"]


def _shard(path: Path, start: int, bad: bool) -> int:
    members = []
    for i in range(start, start + 6):
        members += sample_files(f"{i:09d}", NAMES[i % 3], image_bytes(seed=i), caption=f"{NAMES[i % 3]} on stage")
    n = 6
    if bad:
        members += sample_files("corrupt", "Ann Lee", b"\x00\x01garbage")  # decode_error
        members += sample_files("noimage", "Bob Stone")  # missing_image
        members += [("noidentity.jpg", image_bytes(seed=99))]  # missing_identity
        members += sample_files("notinpool", "Zed Unknown", image_bytes(seed=7))  # ok, not in pool
        members += sample_files(f"{start:09d}", "Ann Lee", image_bytes(seed=8))  # duplicate_key
        members += sample_files("png", "Cara Diaz", image_bytes("PNG", mode="RGBA"), ext="png")
        members += sample_files("latin1", "Cara Diaz", image_bytes(seed=11))  # ok, warning caption_not_utf8
        members += [("latin1.txt", "Cara Díaz à Paris".encode("latin-1"))]
        members += sample_files("000000000", "Ann Lee", image_bytes(seed=12))  # ok; key also in shard 0
        members += [("noname.jpg", image_bytes(seed=13)), ("noname.json", b'{"caption": "x"}')]  # missing_identity
        members += [("badjson.jpg", image_bytes(seed=14)), ("badjson.json", b'{"identity": "Ann')]  # bad_metadata
        n += 10
    write_tar(path, members)
    return n


@pytest.fixture
def job(tmp_path, tiny_model):
    (tmp_path / "shards").mkdir()
    expected = sum(_shard(tmp_path / "shards" / f"{i:05d}.tar", i * 100, bad=i == 1) for i in range(3))
    (tmp_path / "names.txt").write_text("\n".join(NAMES + ["Dee Fox"]) + "\n")
    (tmp_path / "labels.csv").write_text("identity,member\nAnn Lee,true\nBob Stone,false\nCara Diaz,true\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: "shards/{{00000..00002}}.tar", identity_field: identity}}
names: names.txt
labels: labels.csv
attacks: {{idia: {{top_k: 2}}, caption: {{}}}}
compute: {{executor: local, batch_size: 4, decode_threads: 2}}
output: out
""")
    return spec, expected


def _rows(out: Path):
    return pq.read_table(out / "samples").to_pylist()


def test_every_sample_one_row_with_reasons(job):
    spec_path, expected = job
    spec = load_job(spec_path)
    report = run_job(spec, progress=False)
    rows = _rows(spec.output)
    assert len(rows) == expected == report.summary["rows"]
    assert len({(r["shard"], r["position"]) for r in rows}) == len(rows)
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert errors == {"corrupt": "decode_error", "noimage": "missing_image", "noidentity": "missing_identity",
                      "000000100": "duplicate_key", "noname": "missing_identity", "badjson": "bad_metadata"}
    assert all(r["error_detail"] for r in rows if r["status"] == "error")
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(len(r["idia_true_rank"]) == 21 and len(r["idia_top1"]) == 21 for r in ok)
    assert all(x is None for r in ok if r["identity"] == "Zed Unknown" for x in r["idia_true_rank"])
    assert all(r["caption_score"] is not None for r in ok if r["has_caption"])
    assert report.summary["errors"] == {"bad_metadata": 1, "decode_error": 1, "duplicate_key": 1,
                                        "missing_identity": 2, "missing_image": 1}
    # a caption that is not UTF-8 keeps the row scored, with a warning and replacement characters
    latin = next(r for r in rows if r["key"] == "latin1")
    assert latin["status"] == "ok" and latin["warning"] == "caption_not_utf8" and latin["caption_score"] is not None
    assert all(r["warning"] is None for r in rows if r["key"] != "latin1")
    assert report.summary["warnings"] == {"caption_not_utf8": 1}
    # the same key in two shards: both rows kept (shard + key tell them apart), counted in the summary
    assert sorted(r["shard"][-9:] for r in rows if r["key"] == "000000000") == ["00000.tar", "00001.tar"]
    assert report.summary["duplicate_keys_across_shards"] == {"keys": 1, "rows": 2}
    summary_file = json.loads((spec.output / "_SUMMARY.json").read_text())
    assert summary_file["per_shard"][1]["errors"]["duplicate_key"] == 1 and summary_file["rows"] == expected
    assert summary_file["per_shard"][1]["warnings"] == {"caption_not_utf8": 1}


def test_outputs_match_versioned_schemas(job):
    spec = load_job(job[0])
    run_job(spec, progress=False)
    for table, files in (("samples", (spec.output / "samples").glob("*.parquet")),
                         ("embeddings", (spec.output / "embeddings").glob("*.parquet")),
                         ("identities", [spec.output / "identities.parquet"])):
        files = list(files)
        assert files, table
        for f in files:
            schema = pq.read_schema(f)
            assert schema.equals(load_schema(table), check_metadata=False), (table, schema)
            assert (schema.metadata[b"clipaudit.schema_version"]
                    == load_schema(table).metadata[b"clipaudit.schema_version"])
    emb = pq.read_table(spec.output / "embeddings")
    ok = [r for r in _rows(spec.output) if r["status"] == "ok"]
    assert emb.num_rows == len(ok) and emb.schema.field("embedding").type.value_type == "halffloat"
    manifest = json.loads((spec.output / "manifest.json").read_text())
    assert manifest["map_hash"] == map_hash(spec) and len(manifest["model"]["checkpoint_sha256"]) == 64
    assert [s["path"] for s in manifest["shards"]] == expand_shards(spec.data.shards)
    assert manifest["versions"]["torch"] and manifest["summary"]["rows"] == len(_rows(spec.output))
    metrics = json.loads((spec.output / "metrics.json").read_text())
    assert metrics["idia"]["level"] == "identity" and metrics["idia"]["n_members"] == 2


def test_rerun_skips_done_shards_and_redoes_broken_ones(job):
    spec = load_job(job[0])
    first = run_job(spec, progress=False)
    before = sorted(map(str, _rows(spec.output)))
    mtimes = {p: p.stat().st_mtime_ns for p in (spec.output / "samples").glob("*.parquet")}
    again = run_job(spec, progress=False)
    assert again.skipped == 3 and not again.map.done
    assert {p: p.stat().st_mtime_ns for p in (spec.output / "samples").glob("*.parquet")} == mtimes
    # a shard whose part vanished (e.g. a crash between part and marker) is redone
    victim = next(iter(mtimes))
    victim.unlink()
    third = run_job(spec, progress=False)
    assert third.skipped == 2 and len(third.map.done) == 1
    assert sorted(map(str, _rows(spec.output))) == before
    assert first.summary["rows"] == third.summary["rows"]


def test_changed_map_settings_are_refused_unless_forced(job, tmp_path):
    spec = load_job(job[0])
    run_job(spec, progress=False)
    changed = spec.model_copy(update={"attacks": spec.attacks.model_copy(
        update={"idia": spec.attacks.idia.model_copy(update={"top_k": 3})})})
    with pytest.raises(ResumeRefused, match="changed: idia"):
        run_job(changed, progress=False)
    report = run_job(changed, force=True, progress=False)
    assert report.skipped == 0 and len(report.map.done) == 3
    # reduce-only settings (tau) do not change the map hash
    tau = changed.model_copy(update={"attacks": changed.attacks.model_copy(
        update={"idia": changed.attacks.idia.model_copy(update={"tau": 5})})})
    assert run_job(tau, progress=False).skipped == 3


def test_reduce_cli_recomputes_with_new_tau_without_the_model(job, capsys, monkeypatch):
    import clipaudit.model.loading
    from clipaudit.cli import main

    spec = load_job(job[0])
    run_job(spec, progress=False)
    before = {r["identity"]: r for r in pq.read_table(spec.output / "identities.parquet").to_pylist()}

    def no_model(*a, **k):
        raise AssertionError("reduce must not load the model")

    monkeypatch.setattr(clipaudit.model.loading, "load_model", no_model)
    assert main(["reduce", str(spec.output), "--tau", "22"]) == 0
    after = {r["identity"]: r for r in pq.read_table(spec.output / "identities.parquet").to_pylist()}
    assert {k: v["idia_score"] for k, v in after.items()} == {k: v["idia_score"] for k, v in before.items()}
    assert not any(v["idia_member"] for v in after.values())  # 21 templates can never reach tau=22
    assert "wrote" in capsys.readouterr().out
    # overrides obey the spec's own rules: tau 0 or -1 would make everyone a member
    for bad in (["--tau", "0"], ["--tau", "-1"], ["--set", "idia.tau=zero"]):
        assert main(["reduce", str(spec.output), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --set") and "attacks.idia.tau" in err[0], err
    assert main(["reduce", str(spec.output), "--set", "idia.top_k=3"]) == 2  # a map-side setting
    assert "changes the map step" in capsys.readouterr().err
    assert main(["reduce", str(spec.output), "--set", "partcrop.crops=3"]) == 2  # not enabled in this job
    assert "is not enabled" in capsys.readouterr().err
    assert main(["reduce", str(spec.output), "--set", "idia.draws=: x"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["reduce", str(spec.output), "--set", "idia.foo=1"]) == 2
    assert "has no parameter 'foo'" in capsys.readouterr().err
    unchanged = {r["identity"]: r for r in pq.read_table(spec.output / "identities.parquet").to_pylist()}
    assert unchanged == after


def test_caption_reference_model_gives_difficulty_calibrated_score(job, tiny_model):
    spec_path, _ = job
    text = spec_path.read_text().replace(
        "caption: {}",
        f"caption: {{reference_model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}}}}}")
    spec_path.write_text(text)
    spec = load_job(spec_path)
    assert spec.attacks.caption.reference_model.pretrained == str(tiny_model["checkpoint"])
    run_job(spec, progress=False)
    ok = [r for r in _rows(spec.output) if r["status"] == "ok" and r["has_caption"]]
    assert ok
    for r in ok:  # the reference is the audited model itself: nothing is left after calibration
        assert r["caption_ref_score"] == pytest.approx(r["caption_score"], abs=1e-5)
        assert r["caption_calibrated_score"] == pytest.approx(0.0, abs=1e-5)


def test_one_writer_per_output_folder(job, capsys):
    from clipaudit.cli import main
    from clipaudit.io.outputs import OutputBusy, OutputLayout

    spec_path, _ = job
    spec = load_job(spec_path)
    with OutputLayout(spec.output).lock():
        with pytest.raises(OutputBusy, match="another clipaudit process"):
            run_job(spec, progress=False)
        assert main(["run", str(spec_path), "--no-progress"]) == 2
        assert "being written by another clipaudit process (pid" in capsys.readouterr().err
    assert not (spec.output / "samples").exists()  # nothing was written while refused
    assert run_job(spec, progress=False).ok  # the lock went with its holder


def test_temp_files_of_an_interrupted_writer_are_removed_on_rerun(job):
    spec = load_job(job[0])
    run_job(spec, progress=False)
    stale = [spec.output / "_tmp" / "samples.x-0123456789.parquet.tmp-deadbeef",
             spec.output / "_tmp" / "embeddings.x-0123456789.parquet.tmp-cafebabe",
             # where versions before _tmp/ left them
             spec.output / "samples" / ".x-0123456789.parquet.tmp-deadbeef"]
    for p in stale:
        p.write_bytes(b"PAR1 half a part")
    report = run_job(spec, progress=False)
    assert report.skipped == 3 and report.summary["stale_temp_files_removed"] == 3
    assert not any(p.exists() for p in stale)


def test_reduce_cli_with_controls_and_target_fpr(job, capsys):
    from clipaudit.cli import main

    spec = load_job(job[0])
    run_job(spec, progress=False)
    controls = job[0].parent / "controls.csv"
    controls.write_text("shard,key\n" + "".join(f"00002.tar,{200 + i:09d}\n" for i in range(6)))
    assert main(["reduce", str(spec.output), "--controls", str(controls), "--target-fpr", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "calibration.json" in printed and "calibration at target FPR 0.5" in printed
    cal = json.loads((spec.output / "calibration.json").read_text())
    # 6 image controls from the shard file + Bob Stone's images (labelled non-member)
    bob = sum(r["identity"] == "Bob Stone" and r["status"] == "ok" and not r["shard"].endswith("00002.tar")
              for r in _rows(spec.output))
    assert cal["target_fpr"] == 0.5 and cal["image"]["caption"]["n_controls"] == 6 + bob
    assert cal["identity"]["idia"]["n_controls"] == 1 and "fewer than 2" in cal["identity"]["idia"]["note"]
    assert "caption_calibrated" not in cal["image"]  # not computed without a reference model: no entry
    assert main(["reduce", str(spec.output), "--target-fpr", "2"]) == 2
    assert "--target-fpr 2.0: Input should be less than 1" in capsys.readouterr().err
    assert main(["reduce", str(spec.output), "--memory-limit", "lots"]) == 2
    assert "--memory-limit lots: 'lots' is not a size such as 512MB or 4GB" in capsys.readouterr().err


def test_without_flock_support_a_run_warns_and_keeps_other_writers_temp_files(job, monkeypatch, caplog):
    import errno
    import fcntl

    spec = load_job(job[0])
    run_job(spec, progress=False)
    live = spec.output / "_tmp" / "samples.x-0123456789.parquet.tmp-0badf00d"
    live.write_bytes(b"PAR1 being written by another run")

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    report = run_job(spec, progress=False)
    assert report.ok and report.summary["stale_temp_files_removed"] == 0 and live.exists()
    assert "cannot lock" in caplog.text


def test_url_shards_through_fsspec_give_the_same_rows(job, tmp_path):
    import fsspec

    spec = load_job(job[0])
    local = run_job(spec, progress=False)
    fs = fsspec.filesystem("memory")
    urls = []
    for shard in expand_shards(spec.data.shards):
        url = f"memory://clipaudit-runner/{Path(shard).name}"
        fs.pipe(url.removeprefix("memory:/"), Path(shard).read_bytes())
        urls.append(url)
    remote = spec.model_copy(update={"data": spec.data.model_copy(update={"shards": urls}),
                                     "output": tmp_path / "remote"})
    report = run_job(remote, progress=False)
    assert report.ok and report.summary["rows"] == local.summary["rows"]

    def strip(rows):
        return sorted((Path(r["shard"]).name, r["position"], r["key"], r["status"], r["error"], r["idia_top1"])
                      for r in rows)

    remote_rows = _rows(tmp_path / "remote")
    assert strip(remote_rows) == strip(_rows(spec.output))
    assert all(r["shard"].startswith("memory://") for r in remote_rows)


def test_report_cli_prints_what_a_folder_holds(job, capsys):
    from clipaudit.cli import main

    spec = load_job(job[0])
    run_job(spec, progress=False)
    capsys.readouterr()
    assert main(["report", str(spec.output)]) == 0
    out = capsys.readouterr().out
    assert f"samples: {job[1]} rows" in out and "missing_identity=2" in out and "caption_not_utf8=1" in out
    assert "idia " in out and "AUC" in out  # the metrics table
    assert "calibration at target FPR 0.01" in out and "sha256" in out
    assert main(["report", str(job[0].parent)]) == 2
    assert "not a clipaudit output folder" in capsys.readouterr().err


def test_swapped_checkpoint_is_refused_on_resume_unless_forced(job, tiny_model, capsys):
    """Same path, other weights: the resume hash covers the checkpoint's content, not its name."""
    import shutil

    import torch

    from clipaudit.cli import main

    spec_path, _ = job
    latest = spec_path.parent / "latest.pt"
    shutil.copy(tiny_model["checkpoint"], latest)
    spec_path.write_text(spec_path.read_text().replace(str(tiny_model["checkpoint"]), str(latest)))
    assert main(["run", str(spec_path), "--no-progress"]) == 0
    out = load_job(spec_path).output
    before = _rows(out)
    sd = torch.load(latest, weights_only=True)
    torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}, latest)
    capsys.readouterr()
    assert main(["run", str(spec_path), "--no-progress", "--dry-run"]) == 2  # the dry run predicts the refusal
    assert main(["run", str(spec_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "changed: model_files" in err and err.count("error:") == 2
    assert _rows(out) == before  # nothing was mixed in
    assert main(["run", str(spec_path), "--no-progress", "--force"]) == 0
    after = _rows(out)
    assert [r["key"] for r in after] == [r["key"] for r in before]
    changed = [a["caption_score"] != b["caption_score"] for a, b in zip(after, before) if a["has_caption"]]
    assert all(changed)  # every row was recomputed with the new weights
    # the name state is kept by a key that includes the weights' hash: one state per content of the file
    states = [json.loads(p.read_text()) for p in (out / "_state").glob("idia-*/manifest.json")]
    assert len(states) == 2
    assert len({s["identity"]["model_files"]["pretrained_sha256"] for s in states}) == 2


def test_a_folder_whose_run_wrote_no_result_is_not_claimed(job, tiny_model, capsys):
    """A run that fails while loading the model leaves _job.json but no result: the corrected
    spec then runs instead of being refused as a different job."""
    from clipaudit.cli import main

    spec_path, _ = job
    good = spec_path.read_text()
    spec_path.write_text(good.replace("precision: fp32", "precision: fp32, name: ViT-B-32")
                         .replace(f"name: {tiny_model['config']}, ", ""))  # a checkpoint that does not fit
    assert main(["run", str(spec_path), "--no-progress"]) == 2
    out = load_job(spec_path).output
    assert (out / "_job.json").is_file() and not any((out / "samples").glob("*.parquet"))
    spec_path.write_text(good)
    capsys.readouterr()
    assert main(["run", str(spec_path), "--no-progress", "--dry-run"]) == 0
    assert main(["run", str(spec_path), "--no-progress"]) == 0


def test_the_hardware_that_changes_numbers_enters_the_resume_hash(job, monkeypatch):
    """fp16 + torch top-k on a GPU, fp32 + FAISS on a CPU: never resumed into each other."""
    import torch

    spec = load_job(job[0])
    cpu = numerics(spec, "cpu")
    assert cpu == {"device": "cpu", "precision": "fp32", "index": "faiss", "decode": "cpu"}
    auto = spec.model_copy(update={"model": spec.model.model_copy(update={"precision": None})})
    assert numerics(auto, "cuda") == {"device": "cuda", "precision": "fp16", "index": "torch", "decode": "gpu"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the same job, seen from a GPU machine
    gpu_hash = map_hash(auto)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert map_hash(auto) != gpu_hash
    pin = pinned(auto, "cpu")
    assert (pin.model.precision, pin.compute.device, pin.compute.index) == ("fp32", "cpu", "faiss")
    assert map_hash(pin) == map_hash(auto)  # pinning changes nothing the hash sees

    run_job(spec, progress=False)
    other_index = spec.model_copy(update={"compute": spec.compute.model_copy(update={"index": "torch"})})
    with pytest.raises(ResumeRefused, match="changed: numerics"):
        run_job(other_index, progress=False)


def _files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
            if p.is_file() and p.name != ".clipaudit.lock"}


def test_a_second_run_of_a_finished_folder_is_a_no_op_and_says_why_it_recomputes(job, caplog, capsys):
    import logging

    from clipaudit.report.text import print_report

    spec = load_job(job[0])
    first = run_job(spec, progress=False)
    assert first.reduced
    before = _files(spec.output)
    again = run_job(spec, progress=False)
    assert not again.reduced and again.skipped == 3
    assert again.metrics == first.metrics and again.summary == first.summary
    assert _files(spec.output) == before  # not one file rewritten: metrics, manifest, report inputs alike
    print_report(again)
    assert "nothing to do" in capsys.readouterr().out
    # a changed labels file is a reason to redo the reduce step (not the map), and the log says so
    labels = job[0].parent / "labels.csv"
    labels.write_text(labels.read_text().replace("Bob Stone,false", "Bob Stone,true"))
    with caplog.at_level(logging.INFO, logger="clipaudit"):
        third = run_job(spec, progress=False)
    assert third.reduced and not third.map.done
    assert "recomputing the reduce step: changed since the last one: labels file" in caplog.text
    assert third.metrics != first.metrics
    # a reduce with other settings makes the next run recompute with the spec's own
    from clipaudit.cli import main

    assert main(["reduce", str(spec.output), "--tau", "2"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipaudit"):
        fourth = run_job(spec, progress=False)
    assert fourth.reduced and "attack parameters" in caplog.text


def test_a_labelled_identity_missing_from_the_pool_stops_the_job_unless_excluded(job, capsys):
    """IDIA can never rank a name the pool lacks: a labelled name outside it is exit 2 at --dry-run
    and at run, naming it; with missing_names: exclude it is left out of IDIA's figures only."""
    from clipaudit.cli import main

    path = job[0]
    labels = path.parent / "labels.csv"
    labels.write_text(labels.read_text() + "Zed Unknown,false\n")  # has a photo in shard 1, not in names.txt
    for argv in (["run", str(path), "--dry-run"], ["run", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "attacks.idia.missing_names: error" in err[0] and "'Zed Unknown'" in err[0], err
    out = path.parent / "out"
    assert not (out / "samples").exists()  # stopped before any work
    path.write_text(path.read_text().replace("idia: {top_k: 2}", "idia: {top_k: 2, missing_names: exclude}"))
    assert main(["run", str(path), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["idia"]["missing_names"]["identities"] == ["Zed Unknown"]
    assert (metrics["idia"]["n_members"], metrics["idia"]["n_nonmembers"]) == (2, 1)  # Zed left out of IDIA
    zed = next(r for r in pq.read_table(out / "identities.parquet").to_pylist() if r["identity"] == "Zed Unknown")
    assert zed["in_name_pool"] is False and zed["idia_score_at_k"] is None and zed["label_member"] is False


def test_a_map_only_run_then_the_reduce_step_writes_what_one_run_writes(job, tmp_path, capsys):
    """`clipaudit run --map-only` leaves identities and metrics to `clipaudit reduce` (e.g. on a CPU
    node once the GPUs are gone): the two steps write what one run writes, every column, and the
    summary, built from the markers the workers returned, equals the one read back from the store."""
    import pandas as pd

    from clipaudit.cli import main

    spec_path, _ = job
    whole = run_job(load_job(spec_path), progress=False)
    assert main(["run", str(spec_path), "--output", str(tmp_path / "split"), "--map-only", "--no-progress"]) == 0
    assert "clipaudit reduce" in capsys.readouterr().out
    split = tmp_path / "split"
    assert not (split / "identities.parquet").exists() and not (split / "metrics.json").exists()
    summary = json.loads((split / "_SUMMARY.json").read_text())
    assert summary["duplicate_keys_across_shards"] is None  # left to the reduce step
    assert main(["reduce", str(split)]) == 0
    after = json.loads((split / "_SUMMARY.json").read_text())
    mine = json.loads((whole.layout.summary).read_text())
    for s in (after, mine):
        s.pop("map_seconds_this_run")
    assert after == mine
    for name in ("identities.parquet", "roc.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(split / name), pd.read_parquet(whole.layout.root / name))
    assert json.loads((split / "metrics.json").read_text()) == json.loads(whole.layout.metrics.read_text())
