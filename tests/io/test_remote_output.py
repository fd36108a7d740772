"""Outputs on object storage: the sync of a local mirror (on fsspec's in-memory store) and whole
audits written to a moto S3 server on 127.0.0.1 with IAM checks on."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from helpers import (assert_close, assert_same_rows, moto_s3_server, output_files, require_signed_requests,
                     write_tiny_job)

from clipaudit.cli import main
from clipaudit.data.storage import StorageError
from clipaudit.io.remote_output import INDEX_NAME, RemoteOutput
from clipaudit.app.runner import run_job
from clipaudit.app.jobs import load_job

BUCKET = "audit-outputs"
KEY_VAR, SECRET_VAR = "CLIPAUDIT_TEST_OUT_KEY", "CLIPAUDIT_TEST_OUT_SECRET"


# -- the mirror's sync, on fsspec's in-memory store ---------------------------------------

@pytest.fixture
def memory_output(tmp_path):
    url = f"memory://clipaudit-test/{tmp_path.name}"
    yield RemoteOutput.for_url(url, mirror_root=tmp_path / "mirrors"), fsspec.filesystem("memory")
    fsspec.filesystem("memory").rm(f"/clipaudit-test/{tmp_path.name}", recursive=True)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _store_files(fs, remote: RemoteOutput) -> dict[str, bytes]:
    root = remote.url.removeprefix("memory:/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def test_push_sends_changes_once_and_keeps_temp_files_local(memory_output, monkeypatch):
    remote, fs = memory_output
    m = remote.mirror
    _write(m / "samples/a.parquet", "part a")
    _write(m / "_markers/a.done.json", "{}")
    _write(m / "manifest.json", "{}")
    _write(m / "_tmp/samples.b.parquet.tmp-1234", "half a part")
    _write(m / "_cache/shared.npz", "cache")
    _write(m / "samples/.b.parquet.tmp-99", "an old-style temp file")
    _write(m / ".clipaudit.lock", "pid 1")
    order: list[str] = []
    real_put = RemoteOutput.put
    monkeypatch.setattr(RemoteOutput, "put", lambda self, p: (order.append(p.relative_to(m).as_posix()),
                                                              real_put(self, p)))
    assert remote.push() == 3
    assert order == ["samples/a.parquet", "_markers/a.done.json", "manifest.json"]  # parts, markers, manifest
    assert _store_files(fs, remote) == {"samples/a.parquet": b"part a", "_markers/a.done.json": b"{}",
                                        "manifest.json": b"{}"}
    order.clear()
    assert remote.push() == 0 and order == []  # nothing changed
    _write(m / "manifest.json", '{"ended": 1}')
    (m / "samples/a.parquet").unlink()
    assert remote.push() == 1 and order == ["manifest.json"]
    assert _store_files(fs, remote) == {"_markers/a.done.json": b"{}", "manifest.json": b'{"ended": 1}'}


def test_pull_makes_the_mirror_hold_what_the_store_holds(memory_output, tmp_path):
    remote, fs = memory_output
    root = remote.url.removeprefix("memory:/")
    m = remote.mirror
    fs.pipe_file(f"{root}/samples/a.parquet", b"part a")
    fs.pipe_file(f"{root}/_markers/a.done.json", b'{"rows": 1}')
    fs.pipe_file(f"{root}/samples/c.parquet", b"part c")  # put by an actor killed before its marker
    _write(m / "samples/old.parquet", "another run's part")  # leftovers no sync knows of
    _write(m / "_markers/old.done.json", "{}")
    _write(m / "samples/c.parquet", "a stale copy of c")
    assert remote.pull() == 2
    assert (m / "samples/a.parquet").read_bytes() == b"part a"
    assert not (m / "samples/c.parquet").exists()  # no marker: not part of the audit
    assert not (m / "samples/old.parquet").exists() and not (m / "_markers/old.done.json").exists()
    assert remote.pull() == 0  # nothing changed
    fs.pipe_file(f"{root}/_markers/a.done.json", b'{"rows": 2}')  # changed on the store, same size
    fs.rm_file(f"{root}/samples/a.parquet")  # removed on the store (another machine's --force)
    assert remote.pull() == 1
    assert (m / "_markers/a.done.json").read_bytes() == b'{"rows": 2}'
    assert not (m / "samples/a.parquet").exists()
    assert set(json.loads((m / INDEX_NAME).read_text())) == {"_markers/a.done.json"}
    # a file an actor wrote here and put: this store gives no MD5 to prove it is the same, so it is
    # downloaded again (S3 and GCS give one: see the S3 test below, where nothing is fetched twice)
    _write(m / "samples/b.parquet", "part b")
    remote.put(m / "samples/b.parquet")
    fs.pipe_file(f"{root}/_markers/b.done.json", b"{}")
    assert remote.pull() == 2 and (m / "samples/b.parquet").read_bytes() == b"part b"
    assert remote.push() == 0


def test_pull_replaces_unpushed_local_changes_and_never_leaves_a_marker_without_its_part(memory_output,
                                                                                        monkeypatch):
    remote, fs = memory_output
    root = remote.url.removeprefix("memory:/")
    m = remote.mirror
    fs.pipe_file(f"{root}/identities.parquet", b"from the store")
    assert remote.pull() == 1
    _write(m / "identities.parquet", "a reduce that crashed before its push")
    assert remote.pull() == 1 and (m / "identities.parquet").read_bytes() == b"from the store"
    fs.pipe_file(f"{root}/samples/a.parquet", b"part a")
    fs.pipe_file(f"{root}/_markers/a.done.json", b"{}")
    real_get = type(fs).get_file
    calls = []

    def get_file(self, rpath, lpath, **kw):  # the connection drops at the second download
        calls.append(rpath)
        if len(calls) == 2:
            raise ConnectionError("connection reset")
        return real_get(self, rpath, lpath, **kw)

    monkeypatch.setattr(type(fs), "get_file", get_file)
    with pytest.raises(StorageError, match="download of"):
        remote.pull()
    assert (m / "samples/a.parquet").exists() and not (m / "_markers/a.done.json").exists()  # the part came first
    monkeypatch.setattr(type(fs), "get_file", real_get)
    assert remote.pull() == 1 and (m / "_markers/a.done.json").exists()


def test_push_sends_no_part_without_its_marker(memory_output, caplog):
    remote, fs = memory_output
    _write(remote.mirror / "samples/a.parquet", "part a")
    _write(remote.mirror / "embeddings/a.parquet", "embeddings a")
    _write(remote.mirror / "downloads/a.parquet", "img2dataset's status rows")  # not a shard's data part
    assert remote.push() == 1
    assert set(_store_files(fs, remote)) == {"downloads/a.parquet"}
    assert "not sending samples/a.parquet" in caplog.text
    _write(remote.mirror / "_markers/a.done.json", "{}")
    assert remote.push() == 3
    assert set(_store_files(fs, remote)) == {"downloads/a.parquet", "samples/a.parquet", "embeddings/a.parquet",
                                             "_markers/a.done.json"}


def test_two_urls_get_two_mirrors_and_a_url_one_mirror(tmp_path):
    a = RemoteOutput.for_url("s3://bucket/audit", mirror_root=tmp_path)
    assert a.mirror == RemoteOutput.for_url("s3://bucket/audit/", mirror_root=tmp_path).mirror
    assert a.mirror != RemoteOutput.for_url("s3://other/audit", mirror_root=tmp_path).mirror
    assert a.mirror.parent == tmp_path and a.mirror.name.startswith("audit-")


# -- whole audits on a moto S3 server -----------------------------------------------------

@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    """A moto S3 server with an empty output bucket, a writer (may do anything there) and a
    reader (may list and read it); a tiny job written as local inputs."""
    import boto3

    root = tmp_path_factory.mktemp("s3-outputs")
    write_tiny_job(root, tiny_model, root / "local-out", shards=2, per_shard=12,
                   compute="executor: local, max_retries: 1", attacks="{idia: {top_k: 3}, caption: {}}",
                   identities=4, captions=True)
    with moto_s3_server() as endpoint:
        admin = {"endpoint_url": endpoint, "aws_access_key_id": "admin", "aws_secret_access_key": "admin",
                 "region_name": "us-east-1"}
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **admin)
        resources = [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]
        creds = {}
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            creds[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        require_signed_requests(endpoint)
        yield {"endpoint": endpoint, "root": root, "creds": creds}


@pytest.fixture(scope="module")
def local_out(store) -> Path:
    """The tiny job's audit written to a local folder, to compare with."""
    assert run_job(load_job(store["root"] / "job.yaml"), progress=False).ok
    return store["root"] / "local-out"


@pytest.fixture
def writer(store, monkeypatch, tmp_path):
    """The writer's credentials in the environment, a fresh mirror folder for this test."""
    key, secret = store["creds"]["writer"]
    monkeypatch.setenv(KEY_VAR, key)
    monkeypatch.setenv(SECRET_VAR, secret)
    monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "mirror-a"))
    return key, secret


def _options(store: dict) -> dict:
    return {"endpoint_url": store["endpoint"], "key": "${%s}" % KEY_VAR, "secret": "${%s}" % SECRET_VAR}


def _job(store: dict, tmp_path: Path, url: str, shards: str = "{00000..00001}", options: dict | None = None) -> Path:
    """The tiny job writing to ``url`` (inputs stay local)."""
    root = store["root"]
    text = (root / "job.yaml").read_text()
    text = text.replace(f"output: {root / 'local-out'}", f"output: {url}")
    text = text.replace('data: {shards: "shards/{00000..00001}.tar"}',
                        f'data: {{shards: "{root}/shards/{shards}.tar", storage_options: '
                        f'{json.dumps(options or _options(store))}}}')
    text = text.replace("names: names.txt", f"names: {root}/names.txt")
    job = tmp_path / f"job-{abs(hash((url, shards)))}.yaml"
    job.write_text(text)
    return job


def _keys(store: dict, prefix: str) -> set[str]:
    fs = fsspec.filesystem("s3", **{k: v for k, v in _resolved(store).items()})
    fs.invalidate_cache()
    return {p.removeprefix(f"{BUCKET}/{prefix}/") for p in fs.find(f"{BUCKET}/{prefix}")}


def _resolved(store: dict) -> dict:
    from clipaudit.data.storage import resolve_options

    return resolve_options(_options(store))


def test_an_audit_written_to_s3_holds_the_local_audit_and_resumes_from_another_machine(
        store, local_out, writer, tmp_path, monkeypatch, capsys):
    import pandas as pd

    url = f"s3://{BUCKET}/first"
    fetched: list[int] = []
    real_pull = RemoteOutput.pull
    monkeypatch.setattr(RemoteOutput, "pull", lambda self: fetched.append(real_pull(self)) or fetched[-1])
    remote = run_job(load_job(_job(store, tmp_path, url)), progress=False)
    assert remote.ok and remote.summary["rows"] == 24
    # the parts the mapper put are known by their MD5 (S3's ETag): never downloaded, never sent twice
    assert fetched == [0, 0]
    assert RemoteOutput.for_url(url).push() == 0
    monkeypatch.setattr(RemoteOutput, "pull", real_pull)
    assert _keys(store, "first") == output_files(local_out)  # every output file, nothing else
    assert not any(k.startswith(("_tmp/", "_cache/")) or ".tmp-" in k for k in _keys(store, "first"))

    # another machine: `clipaudit query` reads the store itself and copies nothing to local disk
    monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "mirror-b"))
    opts = json.dumps(_options(store))
    assert main(["query", url, "SELECT count(*) AS n FROM samples", "--format", "csv", "--storage-options", opts]) == 0
    assert capsys.readouterr().out.split() == ["n", "24"]
    assert main(["report", url, "--storage-options", opts]) == 0  # so does `clipaudit report` (without --html)
    assert "shards: 2/2 done, 0 failed" in capsys.readouterr().out
    assert not (tmp_path / "mirror-b").exists()
    copy = tmp_path / "store-copy"  # the store as it is, fetched by the test, to compare every column
    fsspec.filesystem("s3", **_resolved(store)).get(f"{BUCKET}/first/", str(copy), recursive=True)
    assert_same_rows(copy, local_out, 0.0)
    assert_same_rows(copy, local_out, 0.0, "embeddings")
    ident, ref = (pq.read_table(d / "identities.parquet").sort_by("identity") for d in (copy, local_out))
    assert ident.schema == ref.schema
    assert_close(ident.to_pydict(), ref.to_pydict())  # means aggregated by DuckDB may differ in the last bit
    # and resumes it: every shard is done
    again = run_job(load_job(_job(store, tmp_path, url)), progress=False)
    assert again.ok and again.skipped == 2

    # the store is readable as it is, without clipaudit
    o = _resolved(store)
    s3_opts = {"key": o["key"], "secret": o["secret"], "endpoint_url": o["endpoint_url"]}
    assert len(pd.read_parquet(f"{url}/samples", storage_options=s3_opts)) == 24


def test_parts_go_up_before_their_marker_and_a_failed_upload_is_retried(store, writer, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/retried"
    puts: list[str] = []
    real_put = RemoteOutput.put
    failed = []

    def put(self, local: Path, final: Path | None = None) -> None:
        rel = (final or local).relative_to(self.mirror).as_posix()
        if rel.startswith("samples/") and not failed:  # the first part upload: a dropped connection
            failed.append(rel)
            raise StorageError(f"output upload of {rel}: connection reset")
        puts.append(rel)
        real_put(self, local, final)

    monkeypatch.setattr(RemoteOutput, "put", put)
    report = run_job(load_job(_job(store, tmp_path, url)), progress=False)
    assert report.ok and report.summary["rows"] == 24 and report.summary["shards_failed"] == 0
    assert failed and failed[0] in puts  # uploaded on the retry
    markers = [i for i, rel in enumerate(puts) if rel.startswith("_markers/")]
    assert len(markers) == 2
    for i in markers:
        stem = puts[i].removeprefix("_markers/").removesuffix(".done.json")
        assert puts.index(f"samples/{stem}.parquet") < i and puts.index(f"embeddings/{stem}.parquet") < i
    assert puts[-1] == "manifest.json"


@pytest.mark.parametrize("arrives", [False, True], ids=["marker-lost", "marker-stored-but-error"])
def test_a_shard_whose_marker_upload_fails_leaves_no_part_anywhere(store, writer, tmp_path, monkeypatch, arrives):
    url = f"s3://{BUCKET}/marker-fails-{arrives}"
    real_put = RemoteOutput.put
    bad = []

    def put(self, local: Path, final: Path | None = None) -> None:
        rel = (final or local).relative_to(self.mirror).as_posix()
        if rel.startswith("_markers/00001-"):  # every attempt: the parts go up, the marker fails
            bad.append(rel)
            if arrives:  # the store took it, the answer was lost (a read timeout)
                real_put(self, local, final)
            raise StorageError(f"output upload of {rel}: connection reset")
        real_put(self, local, final)

    monkeypatch.setattr(RemoteOutput, "put", put)
    report = run_job(load_job(_job(store, tmp_path, url)), progress=False)
    assert not report.ok and len(bad) == 2  # the first attempt and its retry
    assert report.summary["shards_failed"] == 1 and report.summary["rows"] == 12
    stem = bad[0].removeprefix("_markers/").removesuffix(".done.json")
    on_store = _keys(store, f"marker-fails-{arrives}")
    mirror = report.layout.root
    for rel in (f"samples/{stem}.parquet", f"embeddings/{stem}.parquet", bad[0]):
        assert rel not in on_store and not (mirror / rel).exists(), rel
    ident = pq.read_table(mirror / "identities.parquet").to_pydict()
    assert sum(ident["n_images"]) + sum(ident["n_errors"]) == 12  # only the finished shard's rows


def test_force_removes_what_the_new_job_does_not_write_and_other_mirrors_follow(
        store, writer, tmp_path, monkeypatch, capsys):
    url = f"s3://{BUCKET}/forced"
    assert run_job(load_job(_job(store, tmp_path, url)), progress=False).ok
    assert len({k for k in _keys(store, "forced") if k.startswith("_markers/")}) == 2
    monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "mirror-b"))  # the forced run is elsewhere
    report = run_job(load_job(_job(store, tmp_path, url, shards="00000")), force=True, progress=False)
    assert report.ok and report.summary["rows"] == 12
    keys = _keys(store, "forced")
    assert len([k for k in keys if k.startswith("_markers/")]) == 1
    assert len([k for k in keys if k.startswith("samples/")]) == 1
    assert len([k for k in keys if k.startswith("embeddings/")]) == 1
    # a query from the first machine reads the store: the removed shard is gone there too
    monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "mirror-a"))
    assert main(["query", url, "SELECT count(*) FROM samples", "--format", "csv",
                 "--storage-options", json.dumps(_options(store))]) == 0
    assert capsys.readouterr().out.split()[-1] == "12"


def test_reduce_and_report_of_an_output_on_s3_write_back_to_it(store, writer, tmp_path, capsys):
    url = f"s3://{BUCKET}/reduced"
    assert run_job(load_job(_job(store, tmp_path, url)), progress=False).ok
    fs = fsspec.filesystem("s3", **_resolved(store))
    fs.rm_file(f"{BUCKET}/reduced/identities.parquet")
    opts = json.dumps(_options(store))
    assert main(["reduce", url, "--storage-options", opts]) == 0
    assert f"(and to {url})" in capsys.readouterr().out
    mirror = RemoteOutput.for_url(url).mirror
    fs.invalidate_cache()
    assert fs.cat_file(f"{BUCKET}/reduced/identities.parquet") == (mirror / "identities.parquet").read_bytes()
    assert main(["report", url, "--html", "--storage-options", opts]) == 0
    fs.invalidate_cache()
    page = fs.cat_file(f"{BUCKET}/reduced/report.html")
    assert page == (mirror / "report.html").read_bytes() and b"<html" in page


def test_storage_options_go_with_an_output_url_only(tmp_path, capsys):
    assert main(["query", str(tmp_path), "SELECT 1", "--storage-options", "{}"]) == 2
    assert "--storage-options is for an output on object storage" in capsys.readouterr().err
    assert main(["query", "s3://b/x", "SELECT 1", "--storage-options", "[1]"]) == 2
    assert "--storage-options: a JSON object" in capsys.readouterr().err


def test_an_output_the_credentials_may_not_write_says_so(store, writer, tmp_path, monkeypatch, capsys):
    key, secret = store["creds"]["reader"]
    monkeypatch.setenv(KEY_VAR, key)
    monkeypatch.setenv(SECRET_VAR, secret)
    url = f"s3://{BUCKET}/read-only"
    assert main(["run", str(_job(store, tmp_path, url)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: output upload of _job.json: access denied to {url}" in err
    assert _keys(store, "read-only") == set()


def test_a_dead_output_endpoint_is_an_error_before_any_work(store, writer, tmp_path, capsys):
    from helpers import free_port

    options = {**_options(store), "endpoint_url": f"http://127.0.0.1:{free_port()}",
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    url = f"s3://{BUCKET}/dead"
    assert main(["run", str(_job(store, tmp_path, url, options=options)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: output listing: cannot reach the storage endpoint for {url}" in err
    assert not (RemoteOutput.for_url(url).mirror / "samples").exists()


@pytest.mark.ray
def test_ray_actors_put_their_parts_from_their_own_mirror(ray_session, store, local_out, writer, tmp_path,
                                                          monkeypatch):
    """The actors stage parts in another mirror than the driver's (as on another node): the
    driver finds them on the store."""
    url = f"s3://{BUCKET}/on-ray"
    job = _job(store, tmp_path, url)
    job.write_text(job.read_text().replace("executor: local", "executor: ray, workers: 1, cpus_per_worker: 1, "
                                                              "gpus_per_worker: 0"))
    monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "actors"))
    spec = load_job(job)
    actor_mirror = RemoteOutput.for_url(url).mirror
    monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "driver"))
    from clipaudit.executors import ray as ray_executor

    real_run = ray_executor.RayExecutor._run

    def run_with_actor_mirror(self, ray, spec, layout, shards, map_hash, progress, result):
        monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "actors"))  # what the actors are told
        try:
            real_run(self, ray, spec, layout, shards, map_hash, progress, result)
        finally:
            monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "driver"))

    monkeypatch.setattr(ray_executor.RayExecutor, "_run", run_with_actor_mirror)
    report = run_job(spec, progress=False)
    assert report.ok and report.summary["rows"] == 24, report.summary["failed"]
    assert len(list((actor_mirror / "_markers").glob("*.done.json"))) == 2  # written there by the actors
    driver = report.layout.root
    assert driver != actor_mirror and driver.parent == tmp_path / "driver"
    assert_same_rows(driver, local_out, 1e-4)  # fetched from the store by the driver
    assert _keys(store, "on-ray") == output_files(driver)


def test_a_dry_run_with_an_output_on_s3_contacts_no_storage(store, writer, tmp_path, capsys):
    from helpers import free_port

    options = {**_options(store), "endpoint_url": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    url = f"s3://{BUCKET}/planned"
    assert main(["run", str(_job(store, tmp_path, url, options=options)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"output: {url}" in out and "resume check: not done (the output is on object storage" in out
    assert not RemoteOutput.for_url(url).mirror.exists()


def test_a_query_of_an_output_url_reads_the_store_waits_for_no_one_and_says_what_is_wrong(
        tmp_path, monkeypatch, capsys):
    import pyarrow as pa

    from clipaudit.io.outputs import output_layout

    monkeypatch.setenv("CLIPAUDIT_MIRROR_DIR", str(tmp_path / "mirrors"))
    url = f"memory://clipaudit-test/{tmp_path.name}-empty"
    fs, root = fsspec.filesystem("memory"), url.removeprefix("memory:/")
    assert main(["query", url, "SELECT 1"]) == 2
    assert f"error: {url} is not a clipaudit output folder (no samples/*.parquet)" in capsys.readouterr().err
    with fs.open(f"{root}/samples/s-1.parquet", "wb") as f:
        pq.write_table(pa.table({"shard": ["s"] * 3, "position": [0, 1, 2]}), f)
    assert main(["query", url, "SELECT count(*) AS n FROM samples"]) == 2  # a part without its shard's marker
    assert "no samples/*.parquet" in capsys.readouterr().err
    fs.pipe_file(f"{root}/_markers/s-1.done.json", b"{}")
    with output_layout(url).lock():  # a run on this machine holds the mirror: a query reads the store anyway
        assert main(["query", url, "SELECT count(*) AS n FROM samples", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "3"]
    assert not list((tmp_path / "mirrors").rglob("*.parquet"))  # nothing copied to this machine
    fs.rm(root, recursive=True)
