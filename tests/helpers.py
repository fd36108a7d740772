"""Builders for test inputs (tars in img2dataset layout, images of every kind, tiny jobs) and
checks shared by tests (rows equal in every column, the Ray executor's events)."""

from __future__ import annotations

import io
from typing import Any
from collections.abc import Callable
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import ExifTags, Image, ImageDraw


def image_bytes(fmt: str = "JPEG", size=(40, 30), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size[::-1], dtype=np.uint16)
        im = Image.fromarray(arr)
    else:
        arr = rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        if mode != "RGB":
            im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def photo_like(size=(640, 480), seed: int = 0) -> Image.Image:
    """An RGB image with a natural photo's 1/f spectrum plus hard-edged discs and lines: the
    fine detail and edges where resampling differences show (uniform noise exaggerates them)."""
    w, h = size
    rng = np.random.default_rng(seed)
    freq = np.hypot(np.fft.rfftfreq(w)[None, :], np.fft.fftfreq(h)[:, None])
    freq[0, 0] = 1.0
    planes = []
    for _ in range(3):
        spectrum = (rng.normal(size=freq.shape) + 1j * rng.normal(size=freq.shape)) / freq
        spectrum[0, 0] = 0.0
        planes.append(np.fft.irfft2(spectrum, s=(h, w)))
    x = np.stack(planes, -1) @ np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
    im = Image.fromarray(np.clip((x - x.mean()) / x.std() * 40 + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    short = min(w, h)
    for _ in range(12):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(max(1, short // 20), max(2, short // 4))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        line = (*rng.integers(0, w, 1), *rng.integers(0, h, 1), *rng.integers(0, w, 1), *rng.integers(0, h, 1))
        draw.line([int(v) for v in line], fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=max(1, short // 200))
    return im


def encode(im: Image.Image, fmt: str = "JPEG", orientation: int | None = None, **save) -> bytes:
    """``im`` saved as ``fmt`` (JPEG: quality 90 unless given), with an EXIF orientation if asked."""
    if fmt == "JPEG":
        save.setdefault("quality", 90)
    if orientation is not None:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        save["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def sample_files(key: str, identity: str | None, image: bytes | None = None, caption: str | None = None,
                 ext: str = "jpg") -> list[tuple[str, bytes]]:
    files = []
    if image is not None:
        files.append((f"{key}.{ext}", image))
    if identity is not None:
        files.append((f"{key}.json", json.dumps({"key": key, "identity": identity}).encode()))
    if caption is not None:
        files.append((f"{key}.txt", caption.encode()))
    return files


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_tiny_job(tmp_path: Path, tiny_model: dict, out: Path, shards: int = 2, per_shard: int = 120,
                   compute: str = "executor: ray, workers: 1, max_retries: 2",
                   attacks: str = "{idia: {top_k: 3}, encodermi: {views: 16}}", identities: int = 5,
                   captions: bool = False) -> Path:
    """A job on the tiny model: ``shards`` tars of ``per_shard`` random images of ``identities``
    identities (at most 8), with a caption each if asked."""
    assert identities <= 8, "the name pool holds P0..P7"
    (tmp_path / "shards").mkdir(exist_ok=True)
    for s in range(shards):
        members = []
        for i in range(per_shard):
            name = f"P{i % identities}"
            members += sample_files(f"{s}{i:08d}", name, image_bytes(seed=s * 1000 + i, size=(64, 48)),
                                    caption=f"a photo of {name}" if captions else None)
        write_tar(tmp_path / "shards" / f"{s:05d}.tar", members)
    (tmp_path / "names.txt").write_text("\n".join(f"P{i}" for i in range(8)) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: "shards/{{00000..{shards - 1:05d}}}.tar"}}
names: names.txt
attacks: {attacks}
compute: {{{compute}, batch_size: 4, decode_threads: 1}}
output: {out}
""")
    return spec


class MapEvents(logging.Handler):
    """Collects the Ray executor's structured log records (``record.map_event``: dispatch,
    timeout, broken, died) as (event, shard, actor pid) while installed::

        with MapEvents() as events: run_job(...)
    """

    LOGGER = "clipaudit.executors.ray"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, str, int | None]] = []
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "map_event"):
            self.events.append((record.map_event, record.shard, record.actor_pid))

    def of(self, kind: str) -> list[tuple[str, int | None]]:
        return [(shard, pid) for k, shard, pid in list(self.events) if k == kind]

    def __enter__(self) -> MapEvents:
        logger = logging.getLogger(self.LOGGER)
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or (pa.types.is_list(t) and pa.types.is_floating(t.value_type))


def _float_values(values: list) -> tuple[list, np.ndarray]:
    """(null/length pattern, flattened values as float64)."""
    shape = [None if v is None else (len(v) if isinstance(v, list) else -1) for v in values]
    flat = [x for v in values if v is not None for x in (v if isinstance(v, list) else [v])]
    return shape, np.array([np.nan if x is None else x for x in flat], dtype=np.float64)


def assert_same_rows(actual: Path, expected: Path, float_tol: float, table: str = "samples",
                     close: dict[str, Callable[[Any, Any], bool]] | None = None) -> dict[str, float]:
    """The rows of ``actual/table`` equal those of ``expected/table``, every column: exactly
    for non-float columns (and for nulls, list lengths and NaNs in float columns), within
    ``float_tol`` (absolute) for float values, and by ``close[name](a, b)`` for the columns
    named there (e.g. hashes allowed a bit or two apart). Rows are matched by (shard, position).

    Returns the largest absolute difference seen per float column that holds values (to
    choose tolerances).
    """
    a, b = pq.read_table(actual / table), pq.read_table(expected / table)
    assert a.schema.names == b.schema.names, (a.schema.names, b.schema.names)
    assert a.num_rows == b.num_rows, (a.num_rows, b.num_rows)
    order = [("shard", "ascending"), ("position", "ascending")]
    a, b = a.sort_by(order), b.sort_by(order)
    keys = list(zip(a.column("shard").to_pylist(), a.column("position").to_pylist()))
    assert len(set(keys)) == len(keys), "duplicate (shard, position) rows"
    diffs: dict[str, float] = {}
    for name in a.schema.names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if close and name in close:
            bad = [k for k, u, v in zip(keys, x, y)
                   if (u is None) != (v is None) or (u is not None and not close[name](u, v))]
            assert not bad, f"{table}.{name} not close in {len(bad)} rows, first {bad[0]}"
            continue
        if not _is_float(a.schema.field(name).type):
            bad = [k for k, u, v in zip(keys, x, y) if u != v]
            assert not bad, f"{table}.{name} differs in {len(bad)} rows, first {bad[0]}"
            continue
        (sx, fx), (sy, fy) = _float_values(x), _float_values(y)
        assert sx == sy, f"{table}.{name}: nulls or list lengths differ"
        assert np.array_equal(np.isnan(fx), np.isnan(fy)), f"{table}.{name}: NaNs differ"
        d = np.abs(fx - fy)[~np.isnan(fx)]
        if d.size:  # columns of attacks that are off hold nulls only: nothing to measure
            diffs[name] = float(d.max())
            assert diffs[name] <= float_tol, f"{table}.{name}: max |difference| {diffs[name]:.3g} > {float_tol:g}"
    return diffs


#: Float tolerances (absolute) for comparing the outputs of two runs of the same job.
#:
#: * Same executor (a run redone after a fault vs an uninterrupted run): the same code on the
#:   same inputs on the same CPU — floats must be bit-identical (measured: 0 in every column).
#: * Ray actors vs the in-process executor: the same code, but the actors run torch with
#:   another number of intra-op threads; a sum split differently over threads may round
#:   differently in its last bits (~1e-7 for these fp32 values in [-1, 4]) and so flip the
#:   5-decimal rounding of the stored features (1e-5), or one fp16 step of an embedding
#:   (2.4e-4 at |x| < 0.5). Measured on 2 CPU cores: 0 in every column (canary lab, all
#:   attacks; tiny fault-test jobs). A real bug moves far more: drawing EncoderMI/PartCrop/MIM
#:   views with another seed changes scores by 2.8e-3 to 1.8e-2 and features by 7e-3 to 5.6e-2
#:   (measured), another image or a fp16 model by more. Checked on CPU only.
SAME_EXECUTOR_TOL = {"samples": 0.0, "embeddings": 0.0}
OTHER_EXECUTOR_TOL = {"samples": 1e-4, "embeddings": 1e-3}


def assert_same_outputs(actual: Path, expected: Path, tol: dict[str, float]) -> dict[str, float]:
    """samples/ (and embeddings/, where either run wrote them) equal in every column, see
    :func:`assert_same_rows`; returns the largest float difference per column."""
    diffs = {f"samples.{k}": v for k, v in assert_same_rows(actual, expected, tol["samples"]).items()}
    if (actual / "embeddings").exists() or (expected / "embeddings").exists():
        diffs.update({f"embeddings.{k}": v for k, v in
                      assert_same_rows(actual, expected, tol["embeddings"], "embeddings").items()})
    print("max |float difference| per column:", diffs)  # shown with pytest -s
    return diffs


def write_minimal_job(root: Path, model: str = "{name: ViT-B-32}") -> Path:
    """A one-name pool, one empty shard and a job naming them: enough for spec checks and --dry-run."""
    (root / "names.txt").write_text("Ann\n")
    (root / "a.tar").write_bytes(b"")
    job = root / "job.yaml"
    job.write_text(f"model: {model}\ndata: {{shards: a.tar}}\nnames: names.txt\noutput: o\n")
    return job


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _local_server:
    """A server process on 127.0.0.1 at a free port: ``with`` starts it and waits (≤ 60 s) until
    ``probe`` answers, then yields its base URL; leaving the block stops it."""

    what = "server"

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def probe(self, endpoint: str) -> str:
        return endpoint

    def __enter__(self) -> str:
        import subprocess
        import time
        import urllib.request

        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.server = subprocess.Popen(self.command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.probe(self.endpoint), timeout=2).close()
                return self.endpoint
            except OSError as e:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"{self.what} did not answer on {self.endpoint} "
                                       f"(exit {self.server.poll()})") from e
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        import subprocess

        self.server.terminate()
        try:
            self.server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


class moto_s3_server(_local_server):
    """``with moto_s3_server() as endpoint``: moto's S3 server (a real S3 protocol).
    Authentication is off until :func:`require_signed_requests`."""

    what = "moto_server"

    def command(self, port: int) -> list[str]:
        import sys

        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def probe(self, endpoint: str) -> str:
        return f"{endpoint}/moto-api/"


def require_signed_requests(endpoint: str) -> None:
    """Switch moto's IAM checks on: from here every request must be signed and allowed."""
    import urllib.request

    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).close()


def assert_close(a: Any, b: Any, where: str = "") -> None:
    """Equal, floats within 1e-12 (sums in another order), at any depth of lists and dicts."""
    import pytest

    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12, nan_ok=True), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class range_http_server:
    """``with range_http_server(folder) as base_url``: a static HTTP server for ``folder`` on
    127.0.0.1 that answers ``Range: bytes=a-b`` requests (206), as object stores and CDNs do —
    fsspec reads an http(s):// file with random access through them. ``delay_s``: each answer
    waits that long first (a slow store)."""

    def __init__(self, folder: Path, delay_s: float = 0.0) -> None:
        self.folder = folder
        self.delay_s = delay_s

    def __enter__(self) -> str:
        import functools
        import threading
        import time
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        delay_s = self.delay_s

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def send_head(self):  # type: ignore[override]
                time.sleep(delay_s)
                rng = self.headers.get("Range")
                path = Path(self.translate_path(self.path))
                if not rng or not path.is_file():
                    return super().send_head()
                size = path.stat().st_size
                first, _, last = rng.removeprefix("bytes=").partition("-")
                start = int(first) if first else max(0, size - int(last))
                end = min(int(last), size - 1) if first and last else size - 1
                if start >= size:
                    self.send_error(416)
                    return None
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start + 1)
                self.send_response(206)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                return io.BytesIO(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Handler, directory=str(self.folder)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class gcs_emulator(_local_server):
    """``with gcs_emulator("bucket") as endpoint``: gcp-storage-emulator (Google Cloud Storage's
    JSON API, in memory) with ``bucket`` created."""

    what = "gcp-storage-emulator"

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket

    def command(self, port: int) -> list[str]:
        import shutil
        import sys

        exe = shutil.which("gcp-storage-emulator") or str(Path(sys.executable).parent / "gcp-storage-emulator")
        return [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket",
                self.bucket]

    def probe(self, endpoint: str) -> str:
        return f"{endpoint}/storage/v1/b/{self.bucket}"


def output_files(folder: Path) -> set[str]:
    """The files of an output folder that belong on a store, as relative POSIX paths: not the
    temp folder or the lock file."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
            and p.relative_to(folder).parts[0] not in ("_tmp",) and p.name != ".clipaudit.lock"}
