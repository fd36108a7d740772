"""What every executor does: map a list of shards, retrying, and report per-shard stats.

Only the executors know how work is spread (in-process, Ray actors). The map step itself
is :class:`clipaudit.map.mapper.ShardMapper`, identical everywhere.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, TextIO
from collections.abc import Callable

from tqdm import tqdm

from clipaudit.io.outputs import OutputLayout
from clipaudit.spec import JobSpec


@dataclass
class ShardFailure:
    shard: str
    attempts: int
    error: str


@dataclass
class MapResult:
    done: list[dict] = field(default_factory=list)  # ShardStats dicts
    failed: list[ShardFailure] = field(default_factory=list)
    seconds: float = 0.0


class Executor(Protocol):
    def run(self, spec: JobSpec, layout: OutputLayout, shards: list[str], map_hash: str,
            progress: bool = True) -> MapResult:
        ...


def _duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Map progress on stderr: a tqdm bar on a terminal; elsewhere (``ray job logs``, a file, a
    pipe) one ``map progress:`` line every ``interval_s`` seconds and a last one at the end, with
    shards done/total, images, images/s, ETA and errors so far. Nothing when not ``enabled``."""

    def __init__(self, total_shards: int, enabled: bool, interval_s: float = 10.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_shards
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.images = self.shards = self.error_rows = self.failed_shards = 0
        self._t0 = clock()
        self._lines = enabled and not _is_tty(self.stream)
        self._bar = tqdm(total=total_shards, unit="shard", disable=not enabled or self._lines, dynamic_ncols=True,
                         desc="map", file=self.stream)
        self._stop = threading.Event()
        self._count = threading.Lock()
        self._ticker = None
        if self._lines:
            self._ticker = threading.Thread(target=self._tick, args=(interval_s,), name="map-progress", daemon=True)
            self._ticker.start()

    def _tick(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.emit()

    def line(self) -> str:
        """The progress line as of now."""
        elapsed = max(self.clock() - self._t0, 1e-9)
        rate = self.images / elapsed
        left = self.total - self.shards
        eta = "0s" if not left else _duration(elapsed / self.shards * left) if self.shards else "unknown"
        return (f"map progress: shards {self.shards}/{self.total} ({100 * self.shards / max(self.total, 1):.0f}%), "
                f"images {self.images}, {rate:.1f} images/s, ETA {eta}, errors so far: {self.error_rows} rows, "
                f"{self.failed_shards} shards failed (elapsed {_duration(elapsed)})")

    def emit(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def add_images(self, n: int) -> None:
        with self._count:  # called from the threads of shards in flight
            self.images += n
        if not self._bar.disable:
            rate = self.images / max(self.clock() - self._t0, 1e-9)
            self._bar.set_postfix_str(f"{self.images} images, {rate:,.1f} img/s", refresh=True)

    def shard_done(self, error_rows: int = 0, failed: bool = False) -> None:
        """One shard finished (``error_rows``: its sample rows with status error) or failed for good."""
        with self._count:
            self.shards += 1
            self.error_rows += error_rows
            self.failed_shards += failed
            self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
            self.emit()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
