"""``clipaudit bench --scale``: a CPU rehearsal of a LAION-scale job at the real sizes of
everything except the model.

On one machine: a local S3 server (moto) holds the input shards, the output and the name
state; a name pool of ``names`` generated names × 21 templates; ``shards`` small shards of
synthetic JPEGs mapped by Ray actors with a tiny OpenCLIP model (random weights: this measures
the engine, not evidence). The name state — synthetic unit vectors of the model's width, as
the model would write them — is put in the store under the key the job computes, so the job
finds it and builds nothing (the text tower's own speed is measured apart, ``text_*``).

The job runs as ``clipaudit run --map-only`` would, in its own process (the driver), then the
reduce step runs as ``clipaudit reduce`` in another (the post-map tail). Measured:

- ``actor_peak_rss_mb``: the largest peak resident set (VmHWM) of any map actor;
- ``driver_peak_rss_mb``, ``driver_ms_per_shard`` (the driver's CPU time over the shards);
- ``driver_bytes_downloaded``: what the driver received in answer to its requests for the
  output's bucket (counted on its sockets), against ``bytes_written`` (the output's objects,
  without the name state);
- ``map_s``, ``post_map_s`` (wall time of each step).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from clipaudit.app.jobs import load_job
from clipaudit.app.resolve import pinned
from clipaudit.app.runner import reduce_mapped, reduce_options, run_job, saved_spec
from clipaudit.attacks import build_attacks
from clipaudit.bench.map_step import machine, synthetic_name, write_synthetic_names, write_synthetic_shards
from clipaudit.bench.quick import peak_rss_mb
from clipaudit.io.outputs import output_layout
from clipaudit.map.state import job_states
from clipaudit.model.loading import load_model
from clipaudit.spec import ComputeSpec

BUCKET = "clipaudit-rehearsal"  # the output (and its name state)
INPUT_BUCKET = "clipaudit-rehearsal-inputs"  # the shards
# a tiny CLIP (random weights) with a 64-wide embedding: the engine's costs, not the model's
SCALE_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TARGETS = {
    "actor_peak_rss_mb": "<= 1.3 x name_state_mb + 2048",
    "driver_peak_rss_mb": "<= 1536",
    "driver_ms_per_shard": "<= 20",
    "driver_bytes_downloaded": "<= 1 % of bytes_written",
}


# -- the driver's side (its own process) -----------------------------------------------------

class BucketDownloads:
    """Bytes this process receives on its sockets in answer to HTTP requests for one bucket
    (path-style S3 requests, as s3fs sends them to an endpoint URL): every ``send`` that starts a
    request says whether the answer on that socket counts, every ``recv`` then adds up."""

    def __init__(self, bucket: str) -> None:
        self.prefix = f"/{bucket}".encode()
        self.bytes = 0
        self.by_request: dict[str, int] = {}  # "METHOD folder" → bytes (what the bytes were for)
        self._counting: dict[int, str | None] = {}

    def _note(self, sock: socket.socket, data: Any) -> None:
        head = bytes(memoryview(data)[:512])
        method, _, rest = head.partition(b" ")
        if method in (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE"):
            target = rest.split(b" ", 1)[0]
            path, _, query = target.partition(b"?")
            ours = path == self.prefix or path.startswith(self.prefix + b"/")
            what = path.decode(errors="replace").rsplit("/", 1)[0] if b"." in path.rsplit(b"/", 1)[-1] else \
                path.decode(errors="replace") + ("?" + query.decode(errors="replace")[:40] if query else "")
            self._counting[sock.fileno()] = f"{method.decode()} {what}" if ours else None

    def _add(self, sock: socket.socket, n: int) -> None:
        what = self._counting.get(sock.fileno())
        if what is not None:
            self.bytes += n
            self.by_request[what] = self.by_request.get(what, 0) + n

    def install(self) -> None:
        cls = socket.socket
        send, sendall, recv, recv_into = cls.send, cls.sendall, cls.recv, cls.recv_into
        counter = self

        def counted_send(sock, data, *args):
            counter._note(sock, data)
            return send(sock, data, *args)

        def counted_sendall(sock, data, *args):
            counter._note(sock, data)
            return sendall(sock, data, *args)

        def counted_recv(sock, *args):
            data = recv(sock, *args)
            counter._add(sock, len(data))
            return data

        def counted_recv_into(sock, *args):
            n = recv_into(sock, *args)
            counter._add(sock, n)
            return n

        cls.send, cls.sendall, cls.recv, cls.recv_into = counted_send, counted_sendall, counted_recv, counted_recv_into


def drive(spec_path: str, result_path: str) -> None:
    """The driver: ``clipaudit run --map-only`` of the job, with what it cost this process."""

    downloads = BucketDownloads(BUCKET)
    downloads.install()
    cpu0, t0 = time.process_time(), time.perf_counter()
    report = run_job(load_job(spec_path), progress=True, map_only=True)
    result = {
        "driver_cpu_s": time.process_time() - cpu0,
        "driver_wall_s": time.perf_counter() - t0,
        "map_s": report.map.seconds,
        "driver_peak_rss_mb": peak_rss_mb(),
        "driver_bytes_downloaded": downloads.bytes,
        "driver_downloads_by_request": dict(sorted(downloads.by_request.items(), key=lambda kv: -kv[1])[:8]),
        "shards_done": report.summary["shards_done"],
        "shards_failed": report.summary["shards_failed"],
        "rows": report.summary["rows"],
    }
    Path(result_path).write_text(json.dumps(result))


# -- the rehearsal --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_s3(port: int) -> None:
    """The local S3 server's process: moto's server on 127.0.0.1, until terminated."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on the rehearsal's stderr
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    threading.Event().wait()


def _start_s3(log: Callable[[str], None]) -> tuple[Any, str]:
    try:
        import moto.server  # noqa: F401 — only to say what is missing before starting it
    except ImportError:
        raise RuntimeError("bench --scale needs a local S3 server: pip install \"moto[server]>=5,<5.2.6\" "
                           "(in the test extra)") from None
    port = _free_port()
    proc = _SPAWN.Process(target=_serve_s3, args=(port,), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if not proc.is_alive() or time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"the local S3 server (moto) did not start on {url}") from None
            time.sleep(0.3)
    log(f"local S3 server at {url}")
    return proc, url


#: every process of the rehearsal is a fresh interpreter (no fork of this one's threads and memory)
_SPAWN = multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _environment(values: dict[str, str | None]):
    """``os.environ`` with these values (None: unset) while a child process is started in it."""
    def apply(env: dict[str, str | None]) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(old)


def _run_child(target: Callable[..., Any], *args: Any) -> int:
    proc = _SPAWN.Process(target=target, args=args)
    proc.start()
    proc.join()
    return proc.exitcode if proc.exitcode is not None else -1


def _reduce_step(output: str, options: dict[str, Any]) -> None:
    """The post-map tail's process: what ``clipaudit reduce OUTPUT`` does with the job's settings."""
    layout = output_layout(output, options)
    with layout.lock():
        reduce_mapped(layout, reduce_options(saved_spec(layout)))


class PeakRss:
    """Polls the peak resident set (VmHWM) of the processes whose command line holds ``marker``."""

    def __init__(self, marker: bytes, interval_s: float = 0.5) -> None:
        self.marker, self.interval_s = marker, interval_s
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def poll(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if self.marker not in f.read():
                        continue
                with open(f"/proc/{entry.name}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            pid = int(entry.name)
                            self.peaks[pid] = max(self.peaks.get(pid, 0.0), int(line.split()[1]) / 1024)
            except OSError:
                continue

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _put_state(spec_path: Path, log: Callable[[str], None], seed: int) -> tuple[int, float]:
    """Synthetic unit vectors as the job's name state, under the key the job computes; returns
    (bytes, seconds)."""

    t0 = time.perf_counter()
    spec = pinned(load_job(spec_path), "cpu")
    layout = output_layout(spec.output, spec.data.storage_options)
    width = SCALE_CONFIG["embed_dim"]
    total = 0
    for attack, folder in job_states(spec, layout, build_attacks(spec)):
        templates = 1 if getattr(attack, "average", False) else len(attack.templates)
        rng = np.random.default_rng(seed)
        for i, (start, stop) in enumerate(folder.plan.parts):
            block = rng.standard_normal((templates, stop - start, width), dtype=np.float32)
            block /= np.linalg.norm(block, axis=-1, keepdims=True)
            folder.publish_part(i, block)
        manifest = folder.finish()
        total += sum(p["bytes"] for p in manifest["parts"])
        log(f"{attack.name} state: {len(manifest['parts'])} parts, {total / 2**20:.0f} MiB in {folder.where}")
    return total, time.perf_counter() - t0


def _text_rate(model_json: Path, names: int = 4096) -> float:
    """Names × templates the tiny text tower encodes per second on this machine (one template)."""

    model = load_model(str(model_json), None, "fp32", "cpu")
    texts = [f"a photo of {synthetic_name(i)}." for i in range(names)]
    model.encode_texts(texts[:256])  # warm-up
    t0 = time.perf_counter()
    model.encode_texts(texts)
    return names / (time.perf_counter() - t0)


def _output_bytes(fs: Any, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under ``prefix``, the name state left out."""
    found = fs.find(prefix, detail=True)
    sizes = [int(v.get("size") or 0) for k, v in found.items() if "/_state/" not in k and v.get("type") != "directory"]
    return len(sizes), sum(sizes)


def run_scale_bench(names: int = 1_000_000, shards: int = 2000, images_per_shard: int = 2, workers: int = 2,
                    seed: int = 0, log: Callable[[str], None] = print,
                    shards_in_flight: int | None = None) -> dict[str, Any]:
    """The rehearsal (see the module's docstring); one record of figures, targets and verdicts.
    ``shards_in_flight``: the map actors' ``compute.shards_in_flight`` (None: the spec's default)."""
    import s3fs

    with tempfile.TemporaryDirectory(prefix="clipaudit-bench-scale-") as tmp:
        work = Path(tmp)
        server, endpoint = _start_s3(log)
        try:
            options = {"endpoint_url": endpoint, "key": "rehearsal", "secret": "rehearsal"}
            fs = s3fs.S3FileSystem(**options)
            fs.mkdir(BUCKET)
            fs.mkdir(INPUT_BUCKET)
            model_json = work / "clipaudit-rehearsal-tiny.json"
            model_json.write_text(json.dumps(SCALE_CONFIG))
            write_synthetic_names(work / "names.txt", names)
            t0 = time.perf_counter()
            local = write_synthetic_shards(work / "shards", shards * images_per_shard, images_per_shard,
                                           SCALE_CONFIG["vision_cfg"]["image_size"], names)
            fs.put([str(p) for p in local], [f"{INPUT_BUCKET}/shards/{p.name}" for p in local])
            log(f"{shards} shards of {images_per_shard} images on the S3 server in {time.perf_counter() - t0:.1f} s")
            spec_path = work / "job.yaml"
            spec_path.write_text(json.dumps({
                "model": {"name": str(model_json), "precision": "fp32"},
                "data": {"shards": f"s3://{INPUT_BUCKET}/shards/{{00000..{shards - 1:05d}}}.tar",
                         "storage_options": options},
                "names": str(work / "names.txt"),
                "attacks": {"idia": {}},
                "compute": {"executor": "ray", "workers": workers, "cpus_per_worker": 1, "device": "cpu",
                            "batch_size": 64, "decode_threads": 1, "progress_interval_s": 30,
                            **({"shards_in_flight": shards_in_flight} if shards_in_flight else {})},
                "output": f"s3://{BUCKET}/audit",
            }))
            state_bytes, state_s = _put_state(spec_path, log, seed)
            text_rate = _text_rate(model_json)
            # a local Ray started by the driver (not a cluster named in the environment), its temp
            # files in the rehearsal's scratch folder, numerical libraries on one thread per process
            env = {"CLIPAUDIT_SCRATCH_DIR": str(work / "scratch"), "RAY_AUTH_MODE": "disabled",
                   "OMP_NUM_THREADS": "1", "RAY_ADDRESS": None}
            log(f"map step: {shards} shards on {workers} Ray actors (driver in its own process)")
            with _environment(env), PeakRss(b"_MapWorker") as actors:
                code = _run_child(drive, str(spec_path), str(work / "driver.json"))
            if code != 0:
                raise RuntimeError(f"the rehearsal's driver failed (exit {code})")
            driver = json.loads((work / "driver.json").read_text())
            log("post-map: clipaudit reduce, in its own process")
            t1 = time.perf_counter()
            with _environment(env):
                code = _run_child(_reduce_step, f"s3://{BUCKET}/audit", options)
            post_map_s = time.perf_counter() - t1
            if code != 0:
                raise RuntimeError(f"the rehearsal's reduce step failed (exit {code})")
            objects, written = _output_bytes(fs, f"{BUCKET}/audit")
        finally:
            server.terminate()
            server.join()
    state_mb = state_bytes / 2**20
    actor_peak = max(actors.peaks.values(), default=float("nan"))
    per_shard_ms = 1000 * driver["driver_cpu_s"] / shards
    result = {
        "machine": machine("cpu"),
        "names": names,
        "templates": 21,
        "name_state_bytes": state_bytes,
        "name_state_put_s": round(state_s, 1),
        "text_encode_names_per_s": round(text_rate, 1),
        "shards": shards,
        "images": shards * images_per_shard,
        "workers": workers,
        "shards_in_flight": shards_in_flight or ComputeSpec(device="cpu").in_flight,
        "shards_done": driver["shards_done"],
        "shards_failed": driver["shards_failed"],
        "actors_seen": len(actors.peaks),
        "actor_peak_rss_mb": round(actor_peak, 1),
        "driver_peak_rss_mb": round(driver["driver_peak_rss_mb"], 1),
        "map_s": round(driver["map_s"], 1),
        "driver_s": round(driver["driver_wall_s"], 1),
        "post_map_s": round(post_map_s, 1),
        "driver_cpu_s": round(driver["driver_cpu_s"], 2),
        "driver_ms_per_shard": round(per_shard_ms, 2),
        "output_objects": objects,
        "bytes_written": written,
        "driver_bytes_downloaded": driver["driver_bytes_downloaded"],
        "driver_downloads_by_request": driver["driver_downloads_by_request"],
        "targets": TARGETS,
    }
    result["meets"] = {
        "actor_peak_rss_mb": actor_peak <= 1.3 * state_mb + 2048,
        "driver_peak_rss_mb": driver["driver_peak_rss_mb"] <= 1536,
        "driver_ms_per_shard": per_shard_ms <= 20,
        "driver_bytes_downloaded": driver["driver_bytes_downloaded"] <= 0.01 * written,
    }
    return result

