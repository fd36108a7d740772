"""What every executor does: map a list of shards, retrying, and report per-shard stats.

Only the executors know how work is spread (in-process, Ray actors). The map step itself
is :class:`clipaudit.mapper.ShardMapper`, identical everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from tqdm import tqdm

from ..io.outputs import OutputLayout
from ..spec import JobSpec


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
    def run(self, spec: JobSpec, layout: OutputLayout, shards: list[str], progress: bool = True) -> MapResult:
        ...


class Progress:
    """Terminal progress: shards done, images, images/s (stderr, only when asked)."""

    def __init__(self, total_shards: int, enabled: bool) -> None:
        self._bar = tqdm(total=total_shards, unit="shard", disable=not enabled, dynamic_ncols=True, desc="map")
        self._t0 = time.perf_counter()
        self.images = 0

    def add_images(self, n: int) -> None:
        self.images += n
        rate = self.images / max(time.perf_counter() - self._t0, 1e-9)
        self._bar.set_postfix_str(f"{self.images} images, {rate:,.1f} img/s", refresh=True)

    def shard_done(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
