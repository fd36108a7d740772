"""Inputs on s3:// against a real S3 protocol: a moto server on 127.0.0.1 with IAM checks on.

The module starts one ``moto_server``, fills a bucket with the shards, names, labels and
controls of a tiny job, creates a reader (may read that bucket) and a nobody (may read
nothing), then switches authentication on. Jobs reach it only through
``data.storage_options`` with credentials taken from the environment.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import (OTHER_EXECUTOR_TOL, assert_close, assert_same_rows, free_port, moto_s3_server,
                     require_signed_requests, write_tiny_job)

from clipaudit.cli import main
from clipaudit.app.runner import run_job
from clipaudit.app.jobs import load_job
from clipaudit.spec import SpecError
from clipaudit.app.resolve import map_hash

BUCKET, LOCKED = "audit-inputs", "locked-inputs"
KEY_VAR, SECRET_VAR = "CLIPAUDIT_TEST_S3_KEY", "CLIPAUDIT_TEST_S3_SECRET"
FILES = ["shards/00000.tar", "shards/00001.tar", "names.txt", "labels.csv", "controls.csv"]


@pytest.fixture(scope="module")
def s3(tiny_model, tmp_path_factory):
    """A moto S3 server holding a tiny job's inputs under ``s3://audit-inputs/``; yields the
    endpoint, the local copy of the inputs and the reader's and nobody's credentials."""
    import boto3

    root = tmp_path_factory.mktemp("s3-inputs")
    write_tiny_job(root, tiny_model, root / "out", shards=2, per_shard=12, compute="executor: local",
                   attacks="{idia: {top_k: 3}, caption: {}}", identities=4, captions=True)
    (root / "labels.csv").write_text("identity,member\nP0,true\nP1,true\nP2,false\nP3,false\n")
    (root / "controls.csv").write_text("shard,key\nshards/00001.tar,100000003\n")  # a P3 image, path relative

    with moto_s3_server() as endpoint:
        admin = {"endpoint_url": endpoint, "aws_access_key_id": "admin", "aws_secret_access_key": "admin",
                 "region_name": "us-east-1"}
        s3c, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        for bucket in (BUCKET, LOCKED):
            s3c.create_bucket(Bucket=bucket)
            for name in FILES:
                s3c.put_object(Bucket=bucket, Key=name, Body=(root / name).read_bytes())
        read = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}
        creds = {}
        for user, policy in (("reader", read), ("nobody", None)):
            iam.create_user(UserName=user)
            if policy:
                iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            creds[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        require_signed_requests(endpoint)
        yield {"endpoint": endpoint, "root": root, "creds": creds}


@pytest.fixture
def reader_env(s3, monkeypatch):
    """The reader's credentials in the environment variables the jobs reference."""
    key, secret = s3["creds"]["reader"]
    monkeypatch.setenv(KEY_VAR, key)
    monkeypatch.setenv(SECRET_VAR, secret)
    return key, secret


def _s3_job(tmp_path: Path, s3: dict, bucket: str = BUCKET, shards: str | list[str] = "shards/{00000..00001}.tar",
            names: str = "names.txt", labels: str | None = "labels.csv", controls: str | None = "controls.csv",
            options: dict | None = None) -> Path:
    """The tiny job with every input on ``s3://bucket/`` (model and output stay local); ``shards``
    is a brace pattern or a list, relative to the bucket."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = load_job(s3["root"] / "job.yaml", need_backends=False)
    options = options if options is not None else {
        "endpoint_url": s3["endpoint"], "key": "${%s}" % KEY_VAR, "secret": "${%s}" % SECRET_VAR}
    body = {
        "model": {"name": spec.model.name, "pretrained": spec.model.pretrained, "precision": "fp32"},
        "data": {"shards": [f"s3://{bucket}/{s}" for s in shards] if isinstance(shards, list)
                 else f"s3://{bucket}/{shards}",
                 "storage_options": options},
        "names": f"s3://{bucket}/{names}",
        "attacks": {"idia": {"top_k": 3}, "caption": {}},
        "compute": {"executor": "local", "batch_size": 4, "decode_threads": 1, "max_retries": 0},
        "output": str(tmp_path / "out"),
    }
    if labels:
        body["labels"] = f"s3://{bucket}/{labels}"
    if controls:
        body["calibration"] = {"controls": f"s3://{bucket}/{controls}", "target_fpr": 0.5}
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(body, indent=1))  # JSON is YAML
    return job


def _local_job(tmp_path: Path, s3: dict) -> Path:
    """The same job on the local copies of the inputs."""
    root = s3["root"]
    job = tmp_path / "local.yaml"
    job.write_text((root / "job.yaml").read_text().replace(f"output: {root / 'out'}", f"output: {tmp_path / 'local'}")
                   .replace("shards/", f"{root}/shards/").replace("names: names.txt", f"names: {root}/names.txt")
                   + f"labels: {root}/labels.csv\ncalibration: {{controls: {root}/controls.csv, target_fpr: 0.5}}\n")
    return job


def _same_file_name(a: str, b: str) -> bool:
    return a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def test_an_audit_on_s3_gives_the_rows_of_the_same_audit_on_local_files(s3, reader_env, tmp_path):
    local = run_job(load_job(_local_job(tmp_path, s3)), progress=False)
    remote = run_job(load_job(_s3_job(tmp_path, s3)), progress=False)
    assert remote.ok and remote.summary["rows"] == local.summary["rows"] == 24
    out, ref = tmp_path / "out", tmp_path / "local"
    assert_same_rows(out, ref, 0.0, close={"shard": _same_file_name})
    assert_same_rows(out, ref, 0.0, "embeddings", close={"shard": _same_file_name})
    assert {r["shard"] for r in pq.read_table(out / "samples", columns=["shard"]).to_pylist()} == {
        f"s3://{BUCKET}/shards/00000.tar", f"s3://{BUCKET}/shards/00001.tar"}
    ident, ident_ref = (pq.read_table(d / "identities.parquet").sort_by("identity").to_pydict() for d in (out, ref))
    assert ident.keys() == ident_ref.keys()
    for name, values in ident.items():  # means aggregated by DuckDB may differ in the last bit
        assert_close(values, ident_ref[name], name)
    # labels and controls were read from the bucket: the same metrics and calibration
    assert_close(json.loads((out / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text()))
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["controls"]["images"] == 1  # the relative shard path matched against the CSV's URL
    assert calibration["controls"]["images"] == json.loads((ref / "calibration.json").read_text())["controls"]["images"]

    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        data = (s3["root"] / "shards" / entry["path"].rsplit("/", 1)[-1]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["etag"] == hashlib.md5(data).hexdigest()  # S3's ETag of a single-PUT object
    local_manifest = json.loads((ref / "manifest.json").read_text())
    assert all(e["bytes"] and e["etag"] is None for e in local_manifest["shards"])

    # `clipaudit reduce` reads labels, controls and names from the bucket again, with the
    # saved ${VAR} references resolved from this environment
    (out / "metrics.json").unlink()
    assert main(["reduce", str(out)]) == 0
    assert_close(json.loads((out / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text()))


@pytest.mark.ray
def test_ray_actors_get_the_credentials_from_the_driver(ray_session, s3, tmp_path, monkeypatch):
    """The variables are set after Ray started, so only the driver has them."""
    key, secret = s3["creds"]["reader"]
    monkeypatch.setenv(KEY_VAR, key)
    monkeypatch.setenv(SECRET_VAR, secret)
    job = _s3_job(tmp_path, s3, labels=None, controls=None)
    job.write_text(job.read_text().replace('"executor": "local"', '"executor": "ray", "workers": 1, '
                                                                   '"cpus_per_worker": 1, "gpus_per_worker": 0'))
    report = run_job(load_job(job), progress=False)
    assert report.ok and report.summary["rows"] == 24, report.summary["failed"]
    local = run_job(load_job(_local_job(tmp_path, s3)), progress=False)
    assert local.ok
    assert_same_rows(tmp_path / "out", tmp_path / "local", OTHER_EXECUTOR_TOL["samples"],
                     close={"shard": _same_file_name})


def test_secrets_are_never_written_and_storage_options_leave_the_map_hash_alone(s3, reader_env, tmp_path, capsys):
    key, secret = reader_env
    job = _s3_job(tmp_path, s3, labels=None, controls=None,
                  options={"endpoint_url": s3["endpoint"], "key": key, "secret": secret})  # literals in the file
    spec = load_job(job)
    by_reference = load_job(_s3_job(tmp_path / "ref", s3, labels=None, controls=None))
    assert map_hash(spec) == map_hash(by_reference)
    report = run_job(spec, progress=False, spec_text=job.read_text())
    assert report.ok and report.summary["rows"] == 24
    out = tmp_path / "out"
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "manifest.json" in written and out / "_job.json" in written
    leaks = [str(p) for p, data in written.items() if secret.encode() in data or key.encode() in data]
    assert leaks == [], f"credentials written into {leaks}"
    for name in ("manifest.json", "_job.json"):
        options = json.loads((out / name).read_text())["spec"]["data"]["storage_options"]
        assert options == {"endpoint_url": s3["endpoint"], "key": "***", "secret": "***"}
    assert '"secret": "***"' in json.loads((out / "manifest.json").read_text())["spec_yaml"]

    # a saved spec cannot give the redacted secrets back: the reduce step (which reads the name
    # pool from the bucket) says why
    assert main(["reduce", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data.storage_options.key: the job file held this secret itself" in err and "${VAR}" in err

    # the same job with the credentials as references resumes the folder: nothing is redone
    again = run_job(by_reference.model_copy(update={"output": out}), progress=False)
    assert again.ok and again.skipped == 2
    assert main(["reduce", str(out)]) == 0  # the references are saved and resolve here


@pytest.mark.parametrize("field, where, url", [
    ("shards", "data.shards", f"s3://{BUCKET}/shards/00009.tar"),
    ("names", "names", f"s3://{BUCKET}/no-such-names.txt"),
    ("labels", "labels", f"s3://{BUCKET}/no-such-labels.csv"),
    ("controls", "calibration.controls", f"s3://{BUCKET}/no-such-controls.csv"),
])
def test_a_missing_object_is_a_spec_error_naming_it(s3, reader_env, tmp_path, capsys, field, where, url):
    tail = url.removeprefix(f"s3://{BUCKET}/")
    if field == "shards":  # one of three listed shards is missing
        job = _s3_job(tmp_path, s3, shards=["shards/00000.tar", "shards/00001.tar", tail])
    else:
        job = _s3_job(tmp_path, s3, **{field: tail})
    with pytest.raises(SpecError) as e:
        load_job(job)
    assert str(e.value) == f"{where}: object not found: {url}"
    assert main(["run", str(job)]) == 2  # refused before anything runs or is written
    assert f"{where}: object not found: {url}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_credentials_without_permission_say_so(s3, reader_env, tmp_path, monkeypatch):
    with pytest.raises(SpecError, match=rf"data.shards: access denied to s3://{LOCKED}/shards \(.*Access Denied"):
        load_job(_s3_job(tmp_path, s3, bucket=LOCKED))  # the reader may not read this bucket
    with pytest.raises(SpecError, match=rf"data.shards: access denied to s3://{LOCKED}/shards/00000.tar \(the cred"):
        load_job(_s3_job(tmp_path, s3, bucket=LOCKED, shards=["shards/00000.tar"]))  # one object: read, not listed
    nobody_key, nobody_secret = s3["creds"]["nobody"]
    monkeypatch.setenv(KEY_VAR, nobody_key)
    monkeypatch.setenv(SECRET_VAR, nobody_secret)
    with pytest.raises(SpecError, match=rf"data.shards: access denied to s3://{BUCKET}/shards \(.*Access Denied"):
        load_job(_s3_job(tmp_path, s3))
    monkeypatch.setenv(SECRET_VAR, "not-the-secret")
    with pytest.raises(SpecError, match=r"access denied to s3://.*(SignatureDoesNotMatch|signature|Forbidden)"):
        load_job(_s3_job(tmp_path, s3))
    monkeypatch.delenv(SECRET_VAR)
    unset = rf"^data.storage_options.secret: environment variable {SECRET_VAR} is not set$"
    with pytest.raises(SpecError, match=unset):
        load_job(_s3_job(tmp_path, s3))


def test_a_dead_endpoint_fails_loudly(s3, reader_env, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {"endpoint_url": dead, "key": "${%s}" % KEY_VAR, "secret": "${%s}" % SECRET_VAR,
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    job = _s3_job(tmp_path, s3, options=options)
    with pytest.raises(SpecError, match=rf"data.shards: cannot reach the storage endpoint for s3://{BUCKET}/shards "):
        load_job(job)
    # the endpoint dies after the spec was checked: every shard fails, and the run says so
    live = load_job(_s3_job(tmp_path, s3, labels=None, controls=None))
    spec = live.model_copy(update={
        "names": s3["root"] / "names.txt",
        "data": live.data.model_copy(update={"storage_options": options})})
    report = run_job(spec, progress=False)
    assert not report.ok and report.summary["shards_failed"] == 2 and report.summary["shards_done"] == 0
    assert all("Could not connect to the endpoint URL" in f.error for f in report.map.failed)
    from clipaudit.report.text import print_report

    print_report(report)
    out = capsys.readouterr().out
    assert "errors: none" not in out and "no shard was mapped" in out
    assert not (tmp_path / "out" / "identities.parquet").exists()
    assert main(["report", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "see identities.parquet" not in out and "errors: none" not in out
    assert "no shard was mapped" in out and f"FAILED shard s3://{BUCKET}/shards/00000.tar" in out


