"""The same fsspec path for gs:// and https:// as for s3://: a job whose shards and labels are
served over HTTP (a range-capable server on 127.0.0.1), whose name pool is on a local Google
Cloud Storage emulator and whose output goes there too, with storage options per protocol."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import assert_close, assert_same_rows, gcs_emulator, output_files, range_http_server, write_tiny_job

from clipaudit.data.storage import options_for
from clipaudit.app.runner import run_job
from clipaudit.spec import SpecError
from clipaudit.app.jobs import load_job

BUCKET = "audit"


@pytest.fixture(scope="module")
def stores(tiny_model, tmp_path_factory):
    """A tiny job's inputs on disk, served over HTTP; a GCS emulator holding its name pool."""
    import gcsfs

    root = tmp_path_factory.mktemp("other-stores")
    write_tiny_job(root, tiny_model, root / "local-out", shards=2, per_shard=12, compute="executor: local",
                   attacks="{idia: {top_k: 3}, caption: {}}", identities=4, captions=True)
    (root / "labels.csv").write_text("identity,member\nP0,true\nP1,true\nP2,false\nP3,false\n")
    with range_http_server(root) as http, gcs_emulator(BUCKET) as endpoint:
        gs = {"endpoint_url": endpoint, "token": "anon", "project": "test"}
        gcsfs.GCSFileSystem(**gs).put_file(str(root / "names.txt"), f"{BUCKET}/inputs/names.txt")
        yield {"root": root, "http": http, "gs": gs}


def _job(stores: dict, tmp_path: Path, shards: str = "{00000..00001}", names: str = "inputs/names.txt",
         output: str = "gs://audit/out") -> Path:
    root = stores["root"]
    spec = load_job(root / "job.yaml", need_backends=False)
    body = {
        "model": {"name": spec.model.name, "pretrained": spec.model.pretrained, "precision": "fp32"},
        "data": {"shards": f"{stores['http']}/shards/{shards}.tar",
                 # one mapping per protocol, as in fsspec's config files: https:// gets none
                 "storage_options": {"gs": stores["gs"]}},
        "names": f"gs://{BUCKET}/{names}",
        "labels": f"{stores['http']}/labels.csv",
        "attacks": {"idia": {"top_k": 3}, "caption": {}},
        "compute": {"executor": "local", "batch_size": 4, "decode_threads": 1, "max_retries": 0},
        "output": output,
    }
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(body, indent=1))
    return job


def test_shards_over_https_names_and_output_on_gs_give_the_local_audit(stores, tmp_path, monkeypatch):
    import gcsfs

    monkeypatch.setenv("CLIPAUDIT_SCRATCH_DIR", str(tmp_path / "scratch"))
    root = stores["root"]
    (root / "local.yaml").write_text((root / "job.yaml").read_text() + f"labels: {root}/labels.csv\n")
    local = run_job(load_job(root / "local.yaml"), progress=False)
    remote = run_job(load_job(_job(stores, tmp_path)), progress=False)
    assert local.ok and remote.ok and remote.summary["rows"] == local.summary["rows"] == 24
    assert not list((tmp_path / "scratch").rglob("*.parquet"))  # written straight to the store
    fs = gcsfs.GCSFileSystem(**stores["gs"])
    fs.invalidate_cache()
    out, ref = tmp_path / "store-copy", root / "local-out"  # the store as it is, fetched by the test
    fs.get(f"{BUCKET}/out/", str(out), recursive=True)

    def same_file(a: str, b: str) -> bool:
        return a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]

    assert_same_rows(out, ref, 0.0, close={"shard": same_file})
    assert_same_rows(out, ref, 0.0, "embeddings", close={"shard": same_file})
    ident, ident_ref = (pq.read_table(d / "identities.parquet").sort_by("identity").to_pydict() for d in (out, ref))
    assert_close(ident, ident_ref)
    assert_close(json.loads((out / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text()))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["bytes"] for e in manifest["shards"]] == [(root / f"shards/0000{i}.tar").stat().st_size for i in (0, 1)]

    stored = {p.removeprefix(f"{BUCKET}/out/") for p in fs.find(f"{BUCKET}/out")}

    def unhashed(names: set[str]) -> set[str]:  # a part's name hashes its shard's path or URL
        return {re.sub(r"-[0-9a-f]{10}\.", ".", n) for n in names}

    assert unhashed(stored) == unhashed(output_files(ref))


@pytest.mark.parametrize("field, kwargs, message", [
    ("data.shards", {"shards": "{00000..00002}"}, "object not found: {http}/shards/00002.tar"),
    ("names", {"names": "inputs/no-names.txt"}, "object not found: gs://audit/inputs/no-names.txt"),
])
def test_a_missing_object_over_https_or_on_gs_is_a_spec_error(stores, tmp_path, field, kwargs, message):
    with pytest.raises(SpecError) as e:
        load_job(_job(stores, tmp_path, **kwargs))
    assert str(e.value) == f"{field}: {message.format(http=stores['http'])}"


def test_storage_options_per_protocol_or_for_every_url():
    flat = {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "x"}}
    assert options_for("s3://b/k", flat) is flat and options_for("https://h/k", flat) is flat
    per = {"s3": {"endpoint_url": "http://127.0.0.1:9000"}, "gcs": {"token": "anon"}}
    assert options_for("s3://b/k", per) == per["s3"]
    assert options_for("gs://b/k", per) == per["gcs"]  # gs and gcs name the same file system
    assert options_for("https://h/k", per) == {}
    assert options_for("s3://b/k", None) == {}
    assert options_for("s3://b/k", {"S3": {"anon": True}, "gs": None}) == {"anon": True}
    assert options_for("gs://b/k", {"S3": {"anon": True}, "gs": None}) == {}


@pytest.mark.parametrize("options, message", [
    ({"s3": {"anon": True}, "anon": True}, "here the protocols ['s3'] sit beside ['anon']"),
    ({"s3": "anon"}, "storage_options.s3: the options of one protocol, a mapping"),
])
def test_storage_options_that_mix_the_two_shapes_are_a_spec_error(stores, tmp_path, options, message):
    job = _job(stores, tmp_path)
    body = json.loads(job.read_text())
    body["data"]["storage_options"] = options
    job.write_text(json.dumps(body))
    with pytest.raises(SpecError, match=re.escape(message)):
        load_job(job)


def test_an_unset_variable_in_one_protocols_options_names_its_place(monkeypatch):
    from clipaudit.data.storage import StorageError, url_to_fs

    monkeypatch.delenv("CLIPAUDIT_TEST_UNSET", raising=False)
    per = {"s3": {"key": "${CLIPAUDIT_TEST_UNSET}"}, "memory": {}}
    with pytest.raises(StorageError, match=r"^data.storage_options.s3.key: environment variable CLIPAUDIT_TEST_UNSET"):
        url_to_fs("s3://b/k", per)
    assert url_to_fs("memory://b/k", per)[1] == "/b/k"  # the other protocol's entry is not read
