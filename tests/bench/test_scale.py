"""`clipaudit bench --scale`: the rehearsal's plumbing at a small size (its figures are BENCHMARKS.md's)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipaudit.bench.scale import BucketDownloads


class _Objects(BaseHTTPRequestHandler):
    BODIES = {"/mine/a.bin": b"x" * 1000, "/mine-too-long/b.bin": b"y" * 700, "/other/c.bin": b"z" * 500}

    def do_GET(self):
        body = self.BODIES[self.path.split("?")[0]]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_bucket_downloads_count_only_the_answers_to_requests_for_that_bucket(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Objects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    for name in ("send", "sendall", "recv", "recv_into"):  # undone after the test
        monkeypatch.setattr(socket.socket, name, getattr(socket.socket, name))
    counter = BucketDownloads("mine")
    counter.install()
    try:
        paths = ("/other/c.bin", "/mine/a.bin", "/mine-too-long/b.bin", "/mine/a.bin?x=1")
        got = {p: urllib.request.urlopen(base + p).read() for p in paths}
    finally:
        server.shutdown()
    assert got["/mine/a.bin"] == _Objects.BODIES["/mine/a.bin"]
    # two answers of 1000 bytes and their headers; nothing of the other buckets
    assert 2000 < counter.bytes < 2000 + 2 * 400, counter.bytes
    assert set(counter.by_request) == {"GET /mine"}


@pytest.mark.slow
def test_a_small_rehearsal_maps_every_shard_and_measures_its_figures(capsys):
    from clipaudit.cli import main

    code = main(["bench", "--scale", "--names", "20000", "--shards", "12", "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == (0 if all(result["meets"].values()) else 1)
    assert result["shards_done"] == 12 and result["shards_failed"] == 0 and result["actors_seen"] == 2
    assert result["name_state_bytes"] == 20000 * 21 * 64 * 2 + 2 * 128  # fp16, two parts (one .npy header each)
    assert result["output_objects"] >= 3 * 12  # a samples part, an embeddings part and a marker per shard
    assert 0 < result["driver_bytes_downloaded"] < result["bytes_written"]
    assert result["actor_peak_rss_mb"] > 0 and result["driver_peak_rss_mb"] > 0 and result["post_map_s"] > 0
    assert set(result["meets"]) == {"actor_peak_rss_mb", "driver_peak_rss_mb", "driver_ms_per_shard",
                                    "driver_bytes_downloaded"}
