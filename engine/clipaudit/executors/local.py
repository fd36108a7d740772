"""In-process executor: no Ray. For tests, benchmarks and a single GPU."""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from clipaudit.map.mapper import ShardMapper
from clipaudit.io.outputs import OutputLayout
from clipaudit.spec import JobSpec
from clipaudit.executors.base import MapResult, Progress, ShardFailure

log = logging.getLogger(__name__)


class LocalExecutor:
    """Maps shards in this process, ``compute.shards_in_flight`` at once (one computes while the
    next is fetched and the last one's parts are published), with bounded retries per shard.

    ``compute.shard_timeout_s`` does not apply here (it is the Ray executor's): a shard
    mapped by a call in this process cannot be stopped safely half-way — a thread cannot be
    killed, and a call blocked in a read or in the model would leave the mapper's state and
    its half-written parts behind. Use the Ray executor where a shard might hang.
    """

    def run(self, spec: JobSpec, layout: OutputLayout, shards: list[str], map_hash: str,
            progress: bool = True) -> MapResult:
        t0 = time.perf_counter()
        result = MapResult()
        if not shards:
            return result
        mapper = ShardMapper(spec, layout, map_hash)
        mapper.setup_here()
        bar = Progress(len(shards), progress, spec.compute.progress_interval_s)
        attempts = spec.compute.max_retries + 1

        def map_with_retries(shard: str) -> dict | ShardFailure:
            for attempt in range(1, attempts + 1):
                try:
                    stats = mapper.map_shard(shard, on_batch=bar.add_images)
                except Exception as e:  # noqa: BLE001 — per-shard failure, recorded below
                    log.warning("shard %s failed (attempt %d): %s", shard, attempt, e)
                    err = f"{type(e).__name__}: {e}"
                    log.debug(traceback.format_exc())
                    continue
                bar.shard_done(error_rows=sum(stats.errors.values()))
                return stats.to_dict()
            bar.shard_done(failed=True)
            return ShardFailure(shard, attempts, err)

        # the pool's queue holds every shard, but only shards_in_flight threads take them: as many
        # tars (at most) are on the scratch disk at once
        pool = ThreadPoolExecutor(max_workers=spec.compute.in_flight, thread_name_prefix="shard")
        try:
            for outcome in pool.map(map_with_retries, shards):  # in shard order
                if isinstance(outcome, ShardFailure):
                    result.failed.append(outcome)
                else:
                    result.done.append(outcome)
        finally:
            # interrupted (Ctrl-C): the shards not started are dropped, those in flight finish first
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            mapper.close()
        result.seconds = time.perf_counter() - t0
        return result
