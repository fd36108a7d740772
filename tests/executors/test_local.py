"""The in-process executor: shards in flight on threads, results in shard order, an interrupt
that stops the shards not yet started."""

import threading
import time

import pytest

from clipaudit.executors import local
from clipaudit.map.mapper import ShardStats


class _FakeMapper:
    """Maps a shard in 50 ms; shard "stop" raises KeyboardInterrupt, shard "bad" an OSError."""

    calls: list[str] = []
    lock = threading.Lock()

    def __init__(self, spec, layout, map_hash):
        pass

    def setup_here(self):
        pass

    def map_shard(self, shard, on_batch=None):
        with self.lock:
            self.calls.append(shard)
        time.sleep(0.05)
        if shard == "stop":
            raise KeyboardInterrupt
        if shard == "bad":
            raise OSError("read failed")
        return ShardStats(shard=shard, rows=1, ok=1)

    def close(self):
        pass


def _spec(tiny_model, tmp_path, in_flight):
    from helpers import write_tiny_job

    from clipaudit.app.jobs import load_job

    spec = load_job(write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=1, per_shard=2,
                                   compute=f"executor: local, max_retries: 1, shards_in_flight: {in_flight}"))
    return spec


def test_results_come_in_shard_order_with_failures_after_their_retries(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(local, "ShardMapper", _FakeMapper)
    _FakeMapper.calls = []
    shards = ["a", "bad", "c", "d"]
    result = local.LocalExecutor().run(_spec(tiny_model, tmp_path, 2), None, shards, "h", progress=False)
    assert [d["shard"] for d in result.done] == ["a", "c", "d"]
    assert [(f.shard, f.attempts) for f in result.failed] == [("bad", 2)]
    assert sorted(_FakeMapper.calls) == sorted(["a", "bad", "bad", "c", "d"])


def test_an_interrupt_stops_the_shards_not_yet_started(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(local, "ShardMapper", _FakeMapper)
    _FakeMapper.calls = []
    shards = ["stop"] + [f"s{i}" for i in range(20)]
    with pytest.raises(KeyboardInterrupt):
        local.LocalExecutor().run(_spec(tiny_model, tmp_path, 2), None, shards, "h", progress=False)
    assert len(_FakeMapper.calls) <= 4, _FakeMapper.calls  # those in flight when it came, not all 21
