"""Outputs on a store: the store's operations on fsspec's in-memory file system, and whole
audits written straight to a moto S3 server on 127.0.0.1 with IAM checks on (no mirror: nothing
but temp files touches local disk)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (assert_close, assert_same_rows, moto_s3_server, output_files, require_signed_requests,
                     write_tiny_job)

from clipaudit.cli import main
from clipaudit.data.storage import StorageError
from clipaudit.io.outputs import OutputLayout, PartWriter, output_layout
from clipaudit.io.store import SCRATCH_ENV, Store
from clipaudit.app.runner import run_job
from clipaudit.app.jobs import load_job

BUCKET = "audit-outputs"
KEY_VAR, SECRET_VAR = "CLIPAUDIT_TEST_OUT_KEY", "CLIPAUDIT_TEST_OUT_SECRET"


# -- the store, on fsspec's in-memory file system ------------------------------------------

@pytest.fixture
def memory_layout(tmp_path, monkeypatch):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    url = f"memory://clipaudit-test/{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    yield output_layout(url), fs, url.removeprefix("memory:/")
    if fs.exists(f"/clipaudit-test/{tmp_path.name}"):
        fs.rm(f"/clipaudit-test/{tmp_path.name}", recursive=True)


def _on_store(fs, root: str) -> dict[str, bytes]:
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def test_a_layout_on_a_store_writes_whole_files_there_and_leaves_nothing_local(memory_layout, tmp_path):
    layout, fs, root = memory_layout
    assert layout.root.parent == tmp_path / "scratch" and layout.where.startswith("memory://")
    layout.make_dirs()
    part = PartWriter(layout.sample_part("s.tar"), pa.schema([("x", pa.int64())]), layout.tmp_dir)
    part.write({"x": [1, 2, 3]})
    assert _on_store(fs, root) == {}  # a part being written is nowhere on the store
    part.commit(layout.store)
    layout.write_json(layout.marker("s.tar"), {"shard": "s.tar", "rows": 3})
    files = _on_store(fs, root)
    assert set(files) == {layout.sample_part("s.tar").relative_to(layout.root).as_posix(),
                          layout.marker("s.tar").relative_to(layout.root).as_posix()}
    assert layout.is_done("s.tar") and layout.has_map_results()
    assert not [p for p in layout.root.rglob("*") if p.is_file()]  # temp files went with their upload
    assert layout.store.glob(layout.samples_dir) == [layout.sample_part("s.tar")]
    assert layout.read_json(layout.marker("s.tar")) == {"shard": "s.tar", "rows": 3}
    assert layout.read_json(layout.metrics) is None
    layout.write_json(layout.marker("s.tar"), {"shard": "s.tar", "rows": 4})  # disagrees with the part
    assert not layout.is_done("s.tar")
    layout.clear_map_outputs()
    assert _on_store(fs, root) == {} and not layout.has_map_results()


def test_a_failed_upload_removes_its_temp_file_and_says_what_failed(memory_layout, monkeypatch):
    layout, fs, root = memory_layout
    layout.make_dirs()

    def refuse(self, lpath, rpath, **kw):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(type(fs), "put_file", refuse)
    with pytest.raises(StorageError, match="output upload of metrics.json: .*connection reset"):
        layout.write_json(layout.metrics, {"a": 1})
    assert not list(layout.tmp_dir.iterdir())


def test_removals_keep_their_order_and_a_quiet_one_stops_at_the_first_failure(memory_layout, monkeypatch, caplog):
    layout, fs, root = memory_layout
    for name in ("_markers/a.done.json", "samples/a.parquet", "embeddings/a.parquet"):
        fs.pipe_file(f"{root}/{name}", b"x")
    gone: list[str] = []
    real_rm = type(fs).rm_file

    def rm_file(self, path, **kw):
        if path.endswith("samples/a.parquet"):
            raise ConnectionError("connection reset")
        gone.append(path[len(root) + 1:])
        return real_rm(self, path, **kw)

    monkeypatch.setattr(type(fs), "rm_file", rm_file)
    layout.unpublish(*(layout.root / n for n in ("_markers/a.done.json", "samples/a.parquet", "embeddings/a.parquet")))
    assert gone == ["_markers/a.done.json"]  # the marker first; the failure stops the clean-up
    assert "could not remove samples/a.parquet" in caplog.text
    with pytest.raises(StorageError, match="output removal of samples/a.parquet"):
        layout.store.remove(layout.root / "samples/a.parquet")
    monkeypatch.undo()


def test_each_output_url_gets_its_own_scratch_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path))
    a = Store.for_url("memory://bucket/audit")
    assert a.base == Store.for_url("memory://bucket/audit/").base
    assert a.base != Store.for_url("memory://other/audit").base
    assert a.base.parent == tmp_path and a.base.name.startswith("audit-")
    assert a.location(a.base / "samples/x.parquet") == "memory://bucket/audit/samples/x.parquet"
    local = OutputLayout(tmp_path / "out")
    assert not local.store.remote and local.store.location(local.metrics) == str(tmp_path / "out/metrics.json")


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
    """The writer's credentials in the environment, a fresh scratch folder for this test."""
    key, secret = store["creds"]["writer"]
    monkeypatch.setenv(KEY_VAR, key)
    monkeypatch.setenv(SECRET_VAR, secret)
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch-a"))
    return key, secret


def _parquet_files(folder: Path) -> list[Path]:
    return list(folder.rglob("*.parquet")) if folder.exists() else []


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
    remote = run_job(load_job(_job(store, tmp_path, url)), progress=False)
    assert remote.ok and remote.summary["rows"] == 24
    assert _keys(store, "first") == output_files(local_out)  # every output file, nothing else
    assert not any(k.startswith("_tmp/") or ".tmp-" in k for k in _keys(store, "first"))
    assert _parquet_files(tmp_path / "scratch-a") == []  # the run (map and reduce) left no Parquet file here

    # another machine: `clipaudit query` reads the store itself and copies nothing to local disk
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch-b"))
    opts = json.dumps(_options(store))
    assert main(["query", url, "SELECT count(*) AS n FROM samples", "--format", "csv", "--storage-options", opts]) == 0
    assert capsys.readouterr().out.split() == ["n", "24"]
    assert main(["report", url, "--storage-options", opts]) == 0  # so does `clipaudit report` (without --html)
    assert "shards: 2/2 done, 0 failed" in capsys.readouterr().out
    assert _parquet_files(tmp_path / "scratch-b") == []
    copy = tmp_path / "store-copy"  # the store as it is, fetched by the test, to compare every column
    fsspec.filesystem("s3", **_resolved(store)).get(f"{BUCKET}/first/", str(copy), recursive=True)
    assert_same_rows(copy, local_out, 0.0)
    assert_same_rows(copy, local_out, 0.0, "embeddings")
    ident, ref = (pq.read_table(d / "identities.parquet").sort_by("identity") for d in (copy, local_out))
    assert ident.schema == ref.schema
    assert_close(ident.to_pydict(), ref.to_pydict())  # means aggregated by DuckDB may differ in the last bit
    # and resumes it: every shard is done
    again = run_job(load_job(_job(store, tmp_path, url)), progress=False)
    assert again.ok and again.skipped == 2 and not again.reduced  # nothing changed: nothing recomputed
    assert _parquet_files(tmp_path / "scratch-b") == []

    # the store is readable as it is, without clipaudit
    o = _resolved(store)
    s3_opts = {"key": o["key"], "secret": o["secret"], "endpoint_url": o["endpoint_url"]}
    assert len(pd.read_parquet(f"{url}/samples", storage_options=s3_opts)) == 24


def test_parts_go_up_before_their_marker_and_a_failed_upload_is_retried(store, writer, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/retried"
    puts: list[str] = []
    real_publish = Store.publish
    failed = []

    def publish(self, tmp: Path, path: Path) -> None:
        rel = path.relative_to(self.base).as_posix()
        if rel.startswith("samples/") and not failed:  # the first part upload: a dropped connection
            failed.append(rel)
            tmp.unlink()
            raise StorageError(f"output upload of {rel}: connection reset")
        puts.append(rel)
        real_publish(self, tmp, path)

    monkeypatch.setattr(Store, "publish", publish)
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
    real_publish = Store.publish
    bad = []

    def publish(self, tmp: Path, path: Path) -> None:
        rel = path.relative_to(self.base).as_posix()
        if rel.startswith("_markers/00001-"):  # every attempt: the parts go up, the marker fails
            bad.append(rel)
            if arrives:  # the store took it, the answer was lost (a read timeout)
                real_publish(self, tmp, path)
            tmp.unlink(missing_ok=True)
            raise StorageError(f"output upload of {rel}: connection reset")
        real_publish(self, tmp, path)

    monkeypatch.setattr(Store, "publish", publish)
    report = run_job(load_job(_job(store, tmp_path, url)), progress=False)
    assert not report.ok and len(bad) == 2  # the first attempt and its retry
    assert report.summary["shards_failed"] == 1 and report.summary["rows"] == 12
    stem = bad[0].removeprefix("_markers/").removesuffix(".done.json")
    on_store = _keys(store, f"marker-fails-{arrives}")
    for rel in (f"samples/{stem}.parquet", f"embeddings/{stem}.parquet", bad[0]):
        assert rel not in on_store, rel
    assert _parquet_files(tmp_path / "scratch-a") == []
    fs = fsspec.filesystem("s3", **_resolved(store))
    ident = pq.read_table(fs.open(f"{BUCKET}/marker-fails-{arrives}/identities.parquet")).to_pydict()
    assert sum(ident["n_images"]) + sum(ident["n_errors"]) == 12  # only the finished shard's rows


def test_force_removes_what_the_new_job_does_not_write_and_readers_elsewhere_see_it(
        store, writer, tmp_path, monkeypatch, capsys):
    url = f"s3://{BUCKET}/forced"
    assert run_job(load_job(_job(store, tmp_path, url)), progress=False).ok
    assert len({k for k in _keys(store, "forced") if k.startswith("_markers/")}) == 2
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch-b"))  # the forced run is elsewhere
    report = run_job(load_job(_job(store, tmp_path, url, shards="00000")), force=True, progress=False)
    assert report.ok and report.summary["rows"] == 12
    keys = _keys(store, "forced")
    assert len([k for k in keys if k.startswith("_markers/")]) == 1
    assert len([k for k in keys if k.startswith("samples/")]) == 1
    assert len([k for k in keys if k.startswith("embeddings/")]) == 1
    # a query from the first machine reads the store: the removed shard is gone there too
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch-a"))
    assert main(["query", url, "SELECT count(*) FROM samples", "--format", "csv",
                 "--storage-options", json.dumps(_options(store))]) == 0
    assert capsys.readouterr().out.split()[-1] == "12"


def test_reduce_and_report_of_an_output_on_s3_write_back_to_it(store, writer, tmp_path, capsys, monkeypatch):
    url = f"s3://{BUCKET}/reduced"
    assert run_job(load_job(_job(store, tmp_path, url)), progress=False).ok
    fs = fsspec.filesystem("s3", **_resolved(store))
    fs.rm_file(f"{BUCKET}/reduced/identities.parquet")
    opts = json.dumps(_options(store))
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch-b"))  # another machine, which holds no copy
    assert main(["reduce", url, "--storage-options", opts]) == 0
    assert f"{url}/identities.parquet" in capsys.readouterr().out
    fs.invalidate_cache()
    ident = pq.read_table(fs.open(f"{BUCKET}/reduced/identities.parquet"))
    assert sum(ident.column("n_images").to_pylist()) + sum(ident.column("n_errors").to_pylist()) == 24
    assert main(["report", url, "--html", "--storage-options", opts]) == 0
    assert f"html report: {url}/report.html" in capsys.readouterr().out
    fs.invalidate_cache()
    page = fs.cat_file(f"{BUCKET}/reduced/report.html")
    assert b"<html" in page and b"Top identities" in page and url.encode() in page
    assert _parquet_files(tmp_path / "scratch-b") == []


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
    assert "cannot reach the storage endpoint" in err and url in err
    assert _parquet_files(tmp_path / "scratch-a") == []


@pytest.mark.ray
def test_ray_actors_put_their_parts_on_the_store_from_their_own_scratch(ray_session, store, local_out, writer,
                                                                       tmp_path, monkeypatch):
    """The actors write their temp files in another scratch folder than the driver's (as on
    another node): the driver finds the parts on the store."""
    url = f"s3://{BUCKET}/on-ray"
    job = _job(store, tmp_path, url)
    job.write_text(job.read_text().replace("executor: local", "executor: ray, workers: 1, cpus_per_worker: 1, "
                                                              "gpus_per_worker: 0"))
    spec = load_job(job)
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "driver"))
    from clipaudit.executors import ray as ray_executor

    real_run = ray_executor.RayExecutor._run

    def run_with_actor_scratch(self, ray, spec, layout, shards, map_hash, progress, result):
        monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "actors"))  # what the actors are told
        try:
            real_run(self, ray, spec, layout, shards, map_hash, progress, result)
        finally:
            monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "driver"))

    monkeypatch.setattr(ray_executor.RayExecutor, "_run", run_with_actor_scratch)
    report = run_job(spec, progress=False)
    assert report.ok and report.summary["rows"] == 24, report.summary["failed"]
    assert (tmp_path / "actors").is_dir()  # the actors' temp files were written there
    assert report.layout.root.parent == tmp_path / "driver"
    assert _parquet_files(tmp_path / "actors") == [] and _parquet_files(tmp_path / "driver") == []
    assert _keys(store, "on-ray") == output_files(local_out)
    copy = tmp_path / "store-copy"
    fsspec.filesystem("s3", **_resolved(store)).get(f"{BUCKET}/on-ray/", str(copy), recursive=True)
    assert_same_rows(copy, local_out, 1e-4)


def test_a_dry_run_with_an_output_on_s3_contacts_no_storage(store, writer, tmp_path, capsys):
    from helpers import free_port

    options = {**_options(store), "endpoint_url": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    url = f"s3://{BUCKET}/planned"
    assert main(["run", str(_job(store, tmp_path, url, options=options)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"output: {url}" in out and "resume check: not done (the output is on object storage" in out
    assert not (tmp_path / "scratch-a").exists()


def test_a_query_of_an_output_url_reads_the_store_waits_for_no_one_and_says_what_is_wrong(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    url = f"memory://clipaudit-test/{tmp_path.name}-empty"
    fs, root = fsspec.filesystem("memory"), url.removeprefix("memory:/")
    assert main(["query", url, "SELECT 1"]) == 2
    assert f"error: {url} is not a clipaudit output folder (no samples/*.parquet)" in capsys.readouterr().err
    with fs.open(f"{root}/samples/s-1.parquet", "wb") as f:
        pq.write_table(pa.table({"shard": ["s"] * 3, "position": [0, 1, 2]}), f)
    assert main(["query", url, "SELECT count(*) AS n FROM samples"]) == 2  # a part without its shard's marker
    assert "no samples/*.parquet" in capsys.readouterr().err
    fs.pipe_file(f"{root}/_markers/s-1.done.json", b"{}")
    with output_layout(url).lock():  # a run on this machine holds the output: a query reads the store anyway
        assert main(["query", url, "SELECT count(*) AS n FROM samples", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "3"]
    assert _parquet_files(tmp_path / "scratch") == []  # nothing copied to this machine
    fs.rm(root, recursive=True)
