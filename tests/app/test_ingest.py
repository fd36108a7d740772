"""`clipaudit ingest` offline: a URL list served from 127.0.0.1 (good JPEGs, a 404, corrupt bytes,
an HTML page) → img2dataset shards, names.txt, job.yaml → `clipaudit run` → the failed URLs in
_SUMMARY.json and in the `downloads` view."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import sys
import threading
import unicodedata
from pathlib import Path

import pytest
import yaml

pytest.importorskip("img2dataset", reason="the ingest extra is not installed: pip install 'clipaudit[ingest]'")

from clipaudit.cli import main  # noqa: E402
from clipaudit.data.samples import normalize_name  # noqa: E402
from clipaudit.data.tar_reader import iter_tar_samples  # noqa: E402

from helpers import image_bytes  # noqa: E402

# One identity written in decomposed Unicode and with extra spaces: the engine matches names after
# NFC + whitespace folding, so names.txt and the shards must hold the normalised form.
IDENTITIES = ["Ann  Lee", unicodedata.normalize("NFD", "Carla Díaz"), "Bo Chen"]
GOOD = 7
NOT_FOUND = "HTTP Error 404: File not found"
UNDECODABLE = "Image decoding error"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines on stderr
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local HTTP server for the test's files: good JPEGs, corrupt bytes named .jpg, an HTML page."""
    www = tmp_path_factory.mktemp("www")
    for i in range(GOOD):
        (www / f"{i}.jpg").write_bytes(image_bytes(size=(64, 48), seed=i))
    (www / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg at all " * 20)
    (www / "page.html").write_text("<!doctype html><html><body>not an image</body></html>")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def url_rows(base: str) -> list[dict]:
    """11 URLs in shards of 4: shard 0 has a 404, shard 1 is all good, every URL of shard 2 fails."""
    good = [f"{base}/{i}.jpg" for i in range(GOOD)]
    urls = [good[0], good[1], f"{base}/missing-1.jpg", good[2],
            good[3], good[4], good[5], good[6],
            f"{base}/missing-2.jpg", f"{base}/corrupt.jpg", f"{base}/page.html"]
    return [{"url": u, "identity": IDENTITIES[i % 3], "caption": f"a photo number {i}" if i % 2 else ""}
            for i, u in enumerate(urls)]


def write_csv(path: Path, rows: list[dict], columns=("url", "identity", "caption")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def ingested(server, tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("ingest")
    urls = write_csv(root / "urls.csv", url_rows(server))
    out = root / "shards"
    argv = ["ingest", str(urls), str(out), "--pool-size", "60", "--shard-size", "4", "--threads", "2",
            "--timeout", "5", "--model", str(tiny_model["config"]), "--pretrained", str(tiny_model["checkpoint"])]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return {"rc": rc, "stdout": buf.getvalue(), "out": out, "root": root, "urls": urls}


def test_ingest_completes_and_counts_the_failed_urls(ingested):
    assert ingested["rc"] == 0  # some URLs failed, the ingest itself completed
    text = ingested["stdout"]
    assert "ingest: 11 URLs → 7 images in 3 shard(s)" in text
    assert "failed: 4 URLs (failed_to_download=2, failed_to_resize=2)" in text
    assert f"{NOT_FOUND}=2" in text and f"{UNDECODABLE}=2" in text


def test_shards_hold_the_downloaded_samples_with_identity_and_caption(ingested):
    out = ingested["out"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    for i in range(3):  # img2dataset's layout: per-shard status Parquet and stats
        assert (out / f"{i:05d}.parquet").is_file() and (out / f"{i:05d}_stats.json").is_file()
    samples = {i: list(iter_tar_samples(out / f"{i:05d}.tar")) for i in range(3)}
    assert [len(samples[i]) for i in range(3)] == [3, 4, 1]
    assert samples[2][0].error == "empty_shard"  # every URL of shard 2 failed: img2dataset's empty tar
    identities = set()
    for s in samples[0] + samples[1]:
        assert s.error is None and "jpg" in s.files and "txt" in s.files
        meta = json.loads(s.files["json"])
        identities.add(meta["identity"])
        assert meta["status"] == "success"
    assert identities == {normalize_name(n) for n in IDENTITIES}
    captions = {s.files["txt"].decode() for s in samples[0] + samples[1]}
    assert "a photo number 1" in captions and "" in captions


def test_name_pool_holds_every_identity_and_distractors_that_are_never_a_true_name(ingested):
    names = (ingested["out"] / "names.txt").read_text(encoding="utf-8").splitlines()
    assert len(names) == 60 == len(set(names))
    true = {normalize_name(n) for n in IDENTITIES}
    assert true <= set(names)
    distractors = [n for n in names if n not in true]
    assert len(distractors) == 57
    folded = {t.casefold() for t in true}
    assert all(normalize_name(d).casefold() not in folded for d in distractors)
    assert all(len(d.split()) >= 2 or not d.isascii() for d in distractors)  # first + last names


def test_starter_job_points_at_the_shards_and_dry_runs(ingested, capsys):
    job = ingested["out"] / "job.yaml"
    spec = yaml.safe_load(job.read_text())
    assert spec["data"] == {"shards": "{00000..00002}.tar", "identity_field": "identity"}
    assert spec["names"] == "names.txt"
    assert main(["run", str(job), "--dry-run"]) == 0
    assert "shards: 3 (0 already done)" in capsys.readouterr().out


def test_a_run_counts_failed_downloads_and_the_downloads_view_lists_them(ingested, capsys):
    job = ingested["out"] / "job.yaml"
    spec = yaml.safe_load(job.read_text())
    spec["compute"] = {"executor": "local", "batch_size": 4, "decode_threads": 1}
    spec["attacks"] = {"idia": {"top_k": 3}}
    job.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"downloads: 4 of 11 URLs missing from the shards (img2dataset: {NOT_FOUND}=2, {UNDECODABLE}=2)" in printed
    audit = ingested["out"].parent / "shards-audit"
    summary = json.loads((audit / "_SUMMARY.json").read_text())
    assert summary["ok"] == GOOD and summary["errors"] == {"empty_shard": 1}
    assert summary["downloads"] == {
        "shards_with_status": 3, "urls": 11, "success": GOOD, "missing": 4,
        "missing_by_status": {"failed_to_download": 2, "failed_to_resize": 2},
        "missing_by_reason": {NOT_FOUND: 2, UNDECODABLE: 2},
    }
    by_shard = {Path(e["shard"]).name: e.get("downloads") for e in summary["per_shard"]}
    assert by_shard == {"00000.tar": {"urls": 4, "missing": 1}, "00001.tar": {"urls": 4, "missing": 0},
                        "00002.tar": {"urls": 3, "missing": 3}}

    assert main(["query", str(audit), "SELECT url, identity, key, status, error, shard FROM downloads "
                                      "ORDER BY url", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 11
    failed = {r["url"].rsplit("/", 1)[1]: r for r in rows if r["status"] != "success"}
    assert {k: (v["status"], v["error"]) for k, v in failed.items()} == {
        "missing-1.jpg": ("failed_to_download", NOT_FOUND), "missing-2.jpg": ("failed_to_download", NOT_FOUND),
        "corrupt.jpg": ("failed_to_resize", UNDECODABLE), "page.html": ("failed_to_resize", UNDECODABLE)}
    assert all(r["identity"] in {normalize_name(n) for n in IDENTITIES} and r["key"] for r in rows)
    assert {Path(failed[k]["shard"]).name for k in ("missing-2.jpg", "corrupt.jpg", "page.html")} == {"00002.tar"}

    # every downloaded URL is a scored sample under the same shard and key; the empty shard is one error row
    assert main(["query", str(audit), "SELECT d.status, s.status AS sample_status, count(*) AS n FROM downloads d "
                                      "LEFT JOIN samples s ON s.shard = d.shard AND s.key = d.key "
                                      "GROUP BY ALL ORDER BY ALL", "--format", "json"]) == 0
    joined = {(r["status"], r["sample_status"]): r["n"] for r in json.loads(capsys.readouterr().out)}
    assert joined == {("success", "ok"): GOOD, ("failed_to_download", None): 2, ("failed_to_resize", None): 2}

    assert main(["report", str(audit)]) == 0
    assert "downloads: 4 of 11 URLs missing" in capsys.readouterr().out


@pytest.mark.parametrize("column", ["url", "identity"])
def test_a_url_list_without_a_required_column_is_exit_2_naming_it(tmp_path, capsys, column):
    rows = [{"url": "http://127.0.0.1:9/a.jpg", "identity": "Ann Lee", "caption": "x"}]
    urls = write_csv(tmp_path / "urls.csv", rows, columns=[c for c in ("url", "identity", "caption") if c != column])
    assert main(["ingest", str(urls), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"no '{column}' column" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_rows_without_an_identity_and_unreadable_lists_are_exit_2(tmp_path, capsys):
    rows = [{"url": "http://127.0.0.1:9/a.jpg", "identity": "Ann Lee"}, {"url": "http://127.0.0.1:9/b.jpg",
                                                                        "identity": "  "}]
    assert main(["ingest", str(write_csv(tmp_path / "u.csv", rows)), str(tmp_path / "o")]) == 2
    assert "1 row(s) with an empty 'identity' (row 2," in capsys.readouterr().err
    (tmp_path / "u.jsonl").write_text('{"url": "http://127.0.0.1:9/a.jpg", "identity": "Ann Lee"}\n{broken\n')
    assert main(["ingest", str(tmp_path / "u.jsonl"), str(tmp_path / "o")]) == 2
    assert "cannot read the URL list" in capsys.readouterr().err
    (tmp_path / "u.xlsx").write_bytes(b"PK")
    assert main(["ingest", str(tmp_path / "u.xlsx"), str(tmp_path / "o")]) == 2
    assert "unknown URL-list format" in capsys.readouterr().err


def test_a_pool_smaller_than_the_identities_and_a_foreign_output_folder_are_exit_2(tmp_path, capsys):
    rows = [{"url": f"http://127.0.0.1:9/{i}.jpg", "identity": f"Person {i}"} for i in range(5)]
    urls = write_csv(tmp_path / "u.csv", rows)
    assert main(["ingest", str(urls), str(tmp_path / "o"), "--pool-size", "3"]) == 2
    assert "--pool-size 3 is smaller than the number of identities (5)" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    assert main(["ingest", str(urls), str(tmp_path / "busy")]) == 2
    assert "is not empty and was not written by clipaudit ingest" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["img2dataset", "faker"])
def test_without_the_ingest_extra_the_error_names_it(tmp_path, capsys, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    urls = write_csv(tmp_path / "u.csv", [{"url": "http://127.0.0.1:9/a.jpg", "identity": "Ann Lee"}])
    assert main(["ingest", str(urls), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: clipaudit ingest needs img2dataset and Faker") and len(err.splitlines()) == 1
    assert "pip install 'clipaudit[ingest]'" in err and module in err


def test_the_advice_names_only_the_model_keys_that_hold_a_placeholder(ingested):
    assert "set model" not in ingested["stdout"]  # --model and --pretrained were given
    spec = yaml.safe_load((ingested["out"] / "job.yaml").read_text())
    assert spec["model"]["name"].endswith(".json") and spec["model"]["pretrained"].endswith(".pt")


def test_a_rerun_never_overwrites_the_job_the_user_edited(ingested, tmp_path):
    """Re-running resumes; the job.yaml the user edited stays as it is, and this ingest's starter
    (here with placeholder model keys) goes beside it."""
    import contextlib
    import io
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(ingested["out"], out)
    job = out / "job.yaml"
    edited = job.read_text() + "labels: labels.csv\n"
    job.write_text(edited)
    argv = ["ingest", str(ingested["urls"]), str(out), "--pool-size", "60", "--shard-size", "4", "--threads", "2",
            "--timeout", "5"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    assert job.read_text() == edited
    starter = out / "job.starter.yaml"
    text = starter.read_text()
    assert "model.name and model.pretrained: a placeholder" in text
    assert yaml.safe_load(text)["model"] == {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    said = buf.getvalue()
    assert f"job: {job} kept as it was" in said and str(starter) in said
    assert "set model" not in said  # the advice is for a job.yaml ingest wrote, not for the user's own
    # a folder without job.yaml gets the starter as job.yaml, with the advice naming the placeholders
    job.unlink()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    assert yaml.safe_load(job.read_text())["model"]["name"] == "ViT-B-32"
    assert "(set model.name / model.pretrained to the model you audit)" in buf.getvalue()
