"""Ray executor: a pool of map actors (one per GPU, or fractional CPUs), shards handed
out dynamically to actors that have started, bounded retries, dead actors (a killed
worker, a lost node) replaced by new ones placed wherever resources remain.

Each actor holds up to ``compute.shards_in_flight`` shards: while one computes, the next one's
tar is fetched and the last one's parts are uploaded (:mod:`clipaudit.map.mapper`). An actor is
trusted with another shard only after a clean finish or an ``OSError`` (a transient read
failure says nothing about the actor). A shard still running after
``compute.shard_timeout_s`` is abandoned: its actor is killed (a hung actor cannot be
trusted again) and replaced, and the shard is retried like any failure. A shard that waited
behind another on its actor is not late: the driver asks the actor which shard computes, and
since when, and times that one (an actor that cannot answer loses the late shard). Any other
exception (a CUDA error can leave the device context broken) also replaces the actor. The other
shards an actor replaced by the driver held go back to the queue without counting an attempt;
when an actor dies (its process or node lost), each shard it held counts one, as the driver
cannot tell which of them was computing.

The per-job attack state (the name pool's text embeddings, :mod:`clipaudit.map.state`) is
built, where its store lacks it, by Ray tasks with a worker's resources — its parts spread over
as many tasks as there are map actors — and each actor reads it from the store, memory-mapped;
it never passes through the driver or Ray's object store.
Actors write their shard's parts and marker themselves; the driver only keeps score.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any
from collections.abc import Callable

from clipaudit.io.outputs import OutputLayout, output_layout
from clipaudit.io.store import SCRATCH_ENV
from clipaudit.data.storage import resolve_options
from clipaudit.spec import ComputeSpec, JobSpec
from clipaudit.executors.base import MapResult, Progress, ShardFailure
from clipaudit.attacks import build_attacks
from clipaudit.map.mapper import ShardMapper
from clipaudit.map.state import job_states

log = logging.getLogger(__name__)


def _ray():
    import ray  # imported lazily: the local executor and reduce never need it

    return ray


class _MapWorker:
    """Ray actor body: one model per actor, one shard per call; up to ``compute.shards_in_flight``
    calls at once (a threaded actor: the mapper computes one shard at a time and fetches or
    uploads the others meanwhile)."""

    def __init__(self, spec_json: dict, output_root: str, map_hash: str) -> None:
        spec = JobSpec.model_validate(spec_json)
        layout = _layout(spec, output_root)
        self.mapper = ShardMapper(spec, layout, map_hash)
        self.mapper.setup({a.name: f.open() for a, f in job_states(spec, layout, self.mapper.attacks)})

    def map_shard(self, shard: str) -> dict:
        return self.mapper.map_shard(shard).to_dict()

    def compute_status(self) -> dict[str, Any]:
        return self.mapper.compute_status()

    def pid(self) -> int:
        return os.getpid()


def _layout(spec: JobSpec, output_root: str) -> OutputLayout:
    """The driver's output folder, or the output URL (written on its store; temp files in this
    node's scratch folder)."""
    from pathlib import Path

    if spec.output_is_remote():
        return output_layout(str(spec.output), spec.data.storage_options)
    return OutputLayout(Path(output_root))


def _build_state_parts(spec_json: dict, output_root: str, attack: str, part_ids: list[int], part_items: int) -> int:
    """Build these parts of ``attack``'s state (those not on its store yet); returns how many were asked."""
    spec = JobSpec.model_validate(spec_json)
    layout = _layout(spec, output_root)
    mapper = ShardMapper(spec, layout, "")
    try:
        for a, folder in job_states(spec, layout, mapper.attacks, part_items):
            if a.name == attack:
                folder.build(a, mapper.load(), part_ids)
        return len(part_ids)
    finally:
        mapper.close()


def build_states(ray, spec: JobSpec, spec_json: dict, layout: OutputLayout, root: str, placement: dict[str, Any],
                 n_tasks: int) -> None:
    """Every attack state the job lacks, its missing parts spread over ``n_tasks`` Ray tasks with a
    map worker's resources (retried like shards); the driver then checks the parts and publishes
    the manifest. Nothing of the state itself comes back to the driver."""
    for attack, folder in job_states(spec, layout, build_attacks(spec)):
        if folder.manifest() is not None:
            log.info("%s state: found in %s", attack.name, folder.where)
            continue
        missing = folder.missing()
        if missing:
            log.info("%s state: building %d of %d part(s) on %d task(s) into %s", attack.name, len(missing),
                     len(folder.plan.parts), min(n_tasks, len(missing)), folder.where)
            task = ray.remote(_build_state_parts).options(**placement, max_retries=spec.compute.max_retries,
                                                          retry_exceptions=[OSError])
            groups = [missing[i::n_tasks] for i in range(min(n_tasks, len(missing)))]
            ray.get([task.remote(spec_json, root, attack.name, g, folder.plan.part_items) for g in groups])
        folder.finish()


def _placement_probe() -> None:
    """An empty task: it runs once a worker of the pool's shape can be placed."""


def ensure_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:  # a Ray started here for this run: no token auth, and no notice about it on every run
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    return True


def named_cluster(address: str | None) -> bool:
    """Whether the job runs on a Ray cluster named by ``address`` or ``RAY_ADDRESS`` (not a Ray
    that this process starts on this machine)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def cluster_gpus(address: str | None, compute: ComputeSpec | None = None) -> float:
    """GPUs of the Ray cluster the job runs on: connected to when it is a remote one; a local
    Ray is not started for this (its GPUs are this machine's). With ``compute`` (a job that maps
    on GPUs), a remote cluster is first asked for them and waited for (:func:`wait_for_gpus`)."""
    import sys

    running = sys.modules.get("ray")
    remote = named_cluster(address)
    if not remote and not (running is not None and running.is_initialized()):
        import torch

        return float(torch.cuda.device_count())
    ensure_ray(address)
    if remote and compute is not None and compute.gpus_per_worker > 0 and compute.device != "cpu":
        return wait_for_gpus(compute)
    return float(_ray().cluster_resources().get("GPU", 0.0))


def cluster_resources() -> dict[str, float]:
    """The resources of the Ray cluster this process is connected to."""
    return dict(_ray().cluster_resources())


def gpu_bundles(c: ComputeSpec) -> list[dict[str, float]]:
    """What the map step asks of an autoscaling cluster: one bundle per map actor (``workers``,
    default 1), each one actor's CPUs and GPUs, so the autoscaler starts nodes that can hold them."""
    return [{"GPU": c.gpus_per_worker, "CPU": c.cpus_per_worker}] * (c.workers or 1)


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def wait_for_gpus(c: ComputeSpec, poll_s: float = 2.0) -> float:
    """Ask the autoscaler for :func:`gpu_bundles` (a standing request: GPU nodes start although no
    actor is placed yet) and wait up to ``compute.gpu_wait_s`` until the cluster has all those
    GPUs; returns the GPUs it has then (maybe fewer, maybe none: the caller decides). The request
    stays until :func:`release_gpu_request`, so the nodes are not scaled down under the job."""
    ray = _ray()
    bundles = gpu_bundles(c)
    want = sum(b["GPU"] for b in bundles)
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if have >= want:
        return have
    _request_resources(bundles)
    _GPU_REQUEST["standing"] = True
    log.info("asked the autoscaler for %g GPU(s) (%d × %s); the cluster has %g; waiting up to %.0f s "
             "(compute.gpu_wait_s)", want, len(bundles), bundles[0], have, c.gpu_wait_s)
    deadline = time.monotonic() + c.gpu_wait_s
    while have < want and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        have = float(ray.cluster_resources().get("GPU", 0.0))
    if have < want:
        log.warning("after %.0f s the cluster has %g of the %g GPU(s) asked for", c.gpu_wait_s, have, want)
    return have


#: whether this process has asked the autoscaler for GPUs (and must withdraw the request)
_GPU_REQUEST = {"standing": False}


def release_gpu_request() -> None:
    """Withdraw the standing request of :func:`wait_for_gpus`, if any (idle GPU nodes may then go)."""
    if not _GPU_REQUEST["standing"]:
        return
    _GPU_REQUEST["standing"] = False
    try:
        _request_resources([])
    except Exception as e:  # noqa: BLE001 — a clean-up: the job's own result stands
        log.warning("could not withdraw the GPU request from the autoscaler: %s", e)


class _ActorPool:
    """Map actors in two states: starting (placement or model load pending) or started, a
    started one holding up to ``slots`` shards at once (``compute.shards_in_flight``).

    Work goes only to actors that have started, so an actor waiting for resources that a
    lost node took with it never holds a shard; a dead actor is replaced by a new starting one.
    """

    def __init__(self, ray, make_actor, size: int, max_start_failures: int,
                 room: Callable[[], int | None] | None = None, slots: int = 1) -> None:
        self.ray, self.make_actor = ray, make_actor
        #: how many actors the cluster has room for now (None: as many as asked), so that a dead
        #: actor whose node left is not replaced by one that cannot be placed
        self.room = room or (lambda: None)
        self.slots = slots
        self.live: set = set()  # every actor started and not killed: starting or started
        self.starting: dict[Any, Any] = {}  # ready ref → actor
        self.free: dict[Any, int] = {}  # started actor → how many more shards it can take now (in start order)
        self.start_failures, self.max_start_failures = 0, max_start_failures
        self.last_error = ""
        self.pids: dict[Any, int] = {}  # actor → its worker process id, learnt when it started
        for _ in range(size):
            self.start_one()

    def start_one(self) -> None:
        actor = self.make_actor()
        self.live.add(actor)
        self.starting[actor.pid.remote()] = actor

    def take(self):
        """A started actor for one more shard: the one with the most room (the earliest started
        among equals), so shards spread over the actors before any holds two; None if all are full."""
        if not self.free:
            return None
        actor = max(self.free, key=self.free.__getitem__)
        if not self.free[actor]:
            return None
        self.free[actor] -= 1
        return actor

    def give_back(self, actor) -> None:
        """One of ``actor``'s shards is over and the actor is fine: it can take another."""
        if actor in self.free:
            self.free[actor] += 1

    def resize(self, want: int) -> int:
        """Start actors up to ``want`` live ones, or stop starting ones (never a busy one) down to
        it; returns the change."""
        if want > len(self.live):
            n = want - len(self.live)
            for _ in range(n):
                self.start_one()
            return n
        surplus = [(ref, a) for ref, a in self.starting.items()][: len(self.live) - want]
        for ref, actor in surplus:
            del self.starting[ref]
            self.live.discard(actor)
            self.ray.kill(actor)
        return -len(surplus)

    def on_started(self, ref) -> None:
        """An actor's ready ref resolved: started if it did, else a replacement (bounded)."""
        actor = self.starting.pop(ref)
        try:
            pid = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self.start_failures += 1
            self.last_error = _short_error(e)
            log.warning("a map actor failed to start (%d so far): %s", self.start_failures, self.last_error)
            self.live.discard(actor)
            self.ray.kill(actor)
            if self.start_failures <= self.max_start_failures:
                self.start_one()
            return
        self.pids[actor] = pid
        self.free[actor] = self.slots

    def replace(self, dead) -> bool:
        """Kill ``dead`` and start another, unless the cluster no longer has room for it (a node
        left: the pool shrinks, and grows again when :meth:`resize` finds room). False where
        ``dead`` was replaced already (another of its shards reported it first)."""
        if dead not in self.live:
            return False
        self.free.pop(dead, None)  # its pid stays known: the log names it for each shard it held
        self.live.discard(dead)
        self.ray.kill(dead)
        room = self.room()
        if room is None or len(self.live) < max(room, 1):
            self.start_one()
        return True

    def drop_dead_idle(self, timeout_s: float = 30.0) -> None:
        """Ping the actors that hold no shard; replace those that are dead (no answer in time: kept)."""
        idle = [a for a, n in self.free.items() if n == self.slots]
        if not idle:
            return
        pings = {a.pid.remote(): a for a in idle}
        answered, _ = self.ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        for ref in answered:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError:
                log.warning("an idle map actor is gone too; starting a replacement")
                self.replace(pings[ref])

    def alive_or_starting(self) -> bool:
        return bool(self.free or self.starting)

    def kill_all(self, busy: list) -> None:
        for a in {*self.free, *self.starting.values(), *busy}:
            self.ray.kill(a)
        self.live.clear()


class RayExecutor:
    """Maps shards on a pool of Ray actors."""

    #: seconds between two looks at the cluster's resources while mapping (a pool sized by the cluster)
    POOL_CHECK_S = 15.0
    #: how long the driver waits for an actor to say which of its shards computes
    STATUS_TIMEOUT_S = 10.0

    def _pool_shape(self, spec: JobSpec) -> tuple[int, dict[str, Any]]:
        c = spec.compute
        extra = {"resources": dict(c.resources_per_worker)} if c.resources_per_worker else {}
        if _ray().cluster_resources().get("GPU", 0.0) > 0 and c.gpus_per_worker > 0 and c.device != "cpu":
            shape = {"num_gpus": c.gpus_per_worker, "num_cpus": c.cpus_per_worker, **extra}
        else:
            shape = {"num_cpus": c.cpus_per_worker, "num_gpus": 0, **extra}
        if c.workers:
            return c.workers, shape
        slots = self._slots(spec)
        return (max(1, slots) if slots is not None else 2), shape

    def _slots(self, spec: JobSpec) -> int | None:
        """Map actors the cluster has room for now, by its GPUs (a GPU pool) and the custom
        resources each actor asks for; None where neither sizes the pool (a CPU pool: 2 actors)."""
        cluster = _ray().cluster_resources()
        c = spec.compute
        slots = [int(cluster.get(k, 0.0) // v) for k, v in c.resources_per_worker.items() if v > 0]
        if cluster.get("GPU", 0.0) > 0 and c.gpus_per_worker > 0 and c.device != "cpu":
            slots.append(int(cluster["GPU"] // c.gpus_per_worker))
        return min(slots) if slots else None

    def run(self, spec: JobSpec, layout: OutputLayout, shards: list[str], map_hash: str,
            progress: bool = True) -> MapResult:
        t0 = time.perf_counter()
        result = MapResult()
        if not shards:
            return result
        ray = _ray()
        started = ensure_ray(spec.compute.ray_address)
        try:
            self._run(ray, spec, layout, shards, map_hash, progress, result)
        finally:
            release_gpu_request()  # the map step is over: the GPU nodes may go when idle
            if started:
                ray.shutdown()
        result.seconds = time.perf_counter() - t0
        return result

    def _run(self, ray, spec: JobSpec, layout: OutputLayout, shards: list[str], map_hash: str, progress: bool,
             result: MapResult) -> None:
        n_workers, resources = self._pool_shape(spec)
        n_workers = min(n_workers, len(shards))
        # a pool sized by the cluster follows it: more actors as nodes join, fewer as they leave
        follow = spec.compute.workers is None and self._slots(spec) is not None
        spec_json = spec.to_json()
        # ${VAR} references in data.storage_options are resolved here, on the driver, and reach the
        # actors in memory: the worker nodes need not hold the variables
        spec_json["data"]["storage_options"] = resolve_options(spec.data.storage_options)
        root = str(layout.root.resolve())
        placement = dict(resources)
        if os.environ.get(SCRATCH_ENV):
            # the actors write their temp files and shard copies where the driver was told to
            placement["runtime_env"] = {"env_vars": {SCRATCH_ENV: os.environ[SCRATCH_ENV]}}
        # wait (bounded) until a worker of this shape can be placed at all, then (unbounded)
        # for the attack state, whose cost grows with the name pool
        probe = ray.remote(_placement_probe).options(**placement).remote()
        try:
            ray.get(probe, timeout=spec.compute.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(probe, force=True)
            self._give_up(deque(shards), {s: 0 for s in shards}, result, Progress(len(shards), False),
                          f"no worker with {resources} started within {spec.compute.actor_start_timeout_s:.0f} s "
                          f"(cluster resources: {ray.cluster_resources()})")
            return
        build_states(ray, spec, spec_json, layout, root, placement, n_workers)  # fails early: a model that cannot load
        in_flight = spec.compute.in_flight
        # threads for the shards in flight and one more, so that a ping is answered while both work
        actor_cls = ray.remote(_MapWorker).options(**placement, max_restarts=0, max_task_retries=0,
                                                   max_concurrency=in_flight + 1)
        pool = _ActorPool(ray, lambda: actor_cls.remote(spec_json, root, map_hash), n_workers,
                          max_start_failures=n_workers * (spec.compute.max_retries + 1),
                          room=(lambda: self._slots(spec)) if follow else None, slots=in_flight)
        next_look = time.monotonic() + self.POOL_CHECK_S
        start_by: float | None = None  # while no shard is in flight: when an actor must have started
        log.info("map: %d shards on %d actors (%s), up to %d in flight per actor", len(shards), n_workers, resources,
                 in_flight)

        todo = deque(shards)
        attempts: dict[str, int] = {s: 0 for s in shards}
        inflight: dict[Any, tuple[str, Any, float]] = {}  # task ref → (shard, actor, deadline)
        shard_timeout = spec.compute.shard_timeout_s
        bar = Progress(len(shards), progress, spec.compute.progress_interval_s)

        def failed(shard: str, msg: str) -> None:
            if attempts[shard] <= spec.compute.max_retries:
                log.warning("shard %s failed (attempt %d), retrying: %s", shard, attempts[shard], msg)
                todo.append(shard)
            else:
                log.error("shard %s failed after %d attempts: %s", shard, attempts[shard], msg)
                result.failed.append(ShardFailure(shard, attempts[shard], msg))
                bar.shard_done(failed=True)

        def restart_clock(actor) -> None:
            """A shard of ``actor`` is over: the next one it holds (waiting for the compute until now)
            gets a whole ``shard_timeout_s`` from here."""
            deadline = time.monotonic() + shard_timeout
            for ref, (shard, a, d) in list(inflight.items()):
                if a == actor:
                    inflight[ref] = (shard, a, max(d, deadline))

        def late(ref) -> Any | None:
            """``ref``'s deadline has passed: the shard to abandon (``ref``'s, or the one its actor has
            been computing for ``shard_timeout_s`` while ``ref`` waited behind it), or None when ``ref``
            only waits for the compute lock (its deadline, and the computing shard's, moved to when
            they are due; a shard that waits is never late by itself). An actor that does not answer
            within ``STATUS_TIMEOUT_S`` loses ``ref``'s shard."""
            shard, actor, _ = inflight[ref]
            mine = {s: r for r, (s, a, _) in inflight.items() if a == actor}
            if len(mine) < 2:
                return ref
            try:
                status = ray.get(actor.compute_status.remote(), timeout=self.STATUS_TIMEOUT_S)
            except Exception:  # noqa: BLE001 — stuck holding the GIL, or gone: nothing to tell the shards apart
                return ref
            if shard not in status["waiting"]:
                return ref  # stuck in its own fetch, compute or upload
            other = mine.get(status["computing"])
            if other is not None and status["computing_s"] >= shard_timeout:
                return other
            # the lock is held by a shard within its time, or was just released (none computes)
            due = time.monotonic() + (shard_timeout - status["computing_s"] if other is not None else 0.0)
            if other is not None:
                inflight[other] = (status["computing"], actor, due)
            inflight[ref] = (shard, actor, due + shard_timeout)
            log.debug("shard %s waits behind %s (computing %.0f s) on map actor pid %s: not late yet", shard,
                      status["computing"], status["computing_s"], pool.pids.get(actor))
            return None

        def requeue_others(actor) -> None:
            """The driver is replacing ``actor``: the other shards it held go back to the queue,
            their attempt not counted (they only waited behind the shard that failed)."""
            for ref, (shard, a, _) in list(inflight.items()):
                if a == actor:
                    del inflight[ref]
                    attempts[shard] -= 1
                    todo.appendleft(shard)
                    log.info("shard %s: back in the queue, its map actor was replaced while it waited", shard,
                             extra=_event("requeued", shard, pool.pids.get(actor)))

        try:
            while todo or inflight:
                if follow and time.monotonic() >= next_look:
                    next_look = time.monotonic() + self.POOL_CHECK_S
                    room = self._slots(spec) or 0
                    change = pool.resize(max(1, min(room, len(todo) + len(inflight))))
                    if change:
                        log.info("the cluster has room for %d map actor(s): %s %d (now %d)", room,
                                 "started" if change > 0 else "stopped", abs(change), len(pool.live))
                while todo and (actor := pool.take()) is not None:
                    shard = todo.popleft()
                    attempts[shard] += 1
                    log.debug("shard %s: attempt %d on map actor pid %s", shard, attempts[shard], pool.pids.get(actor),
                              extra=_event("dispatch", shard, pool.pids.get(actor)))
                    inflight[actor.map_shard.remote(shard)] = (shard, actor, time.monotonic() + shard_timeout)
                if not inflight and not pool.alive_or_starting():
                    self._give_up(todo, attempts, result, bar, f"no map actor could start: {pool.last_error}")
                    break
                if inflight:  # wake up for the earliest shard deadline
                    timeout = max(0.0, min(d for _, _, d in inflight.values()) - time.monotonic())
                    start_by = None
                else:  # only starting actors: one of them must start in time (counted across looks)
                    start_by = start_by or time.monotonic() + spec.compute.actor_start_timeout_s
                    timeout = max(0.0, start_by - time.monotonic())
                look_in = max(0.0, next_look - time.monotonic())
                to_look = follow and look_in < timeout  # wake up for the next look at the cluster first
                ready, _ = ray.wait([*inflight, *pool.starting], num_returns=1,
                                    timeout=look_in if to_look else timeout)
                if not ready and to_look:
                    continue
                if not ready and inflight:
                    now = time.monotonic()
                    for ref in [r for r, (_, _, d) in inflight.items() if d <= now]:
                        if ref not in inflight or inflight[ref][2] > now:  # requeued, or found waiting
                            continue
                        ref = late(ref)
                        if ref is None:
                            continue
                        shard, actor, _ = inflight.pop(ref)
                        log.warning("shard %s still running after %g s on map actor pid %s: killing the actor, "
                                    "starting a replacement", shard, shard_timeout, pool.pids.get(actor),
                                    extra=_event("timeout", shard, pool.pids.get(actor)))
                        requeue_others(actor)
                        pool.replace(actor)  # kills it: an actor task cannot be force-cancelled
                        failed(shard, f"timed out: not finished within compute.shard_timeout_s = {shard_timeout:g} s")
                    continue
                if not ready:
                    self._give_up(todo, attempts, result, bar,
                                  f"no map actor started within {spec.compute.actor_start_timeout_s:.0f} s "
                                  f"(cluster resources "
                                  f"{ray.available_resources()}, per actor {resources})")
                    break
                ref = ready[0]
                if ref in pool.starting:
                    pool.on_started(ref)
                    continue
                shard, actor, _ = inflight.pop(ref)
                try:
                    stats = ray.get(ref)
                except ray.exceptions.RayError as e:
                    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, OSError):
                        pool.give_back(actor)  # a read failure (transient I/O): the actor is fine
                    elif isinstance(e, ray.exceptions.RayTaskError):  # e.g. a CUDA error: the actor may be broken
                        log.warning("map actor pid %s raised %s on %s; replacing it", pool.pids.get(actor),
                                    type(e.cause).__name__, shard, extra=_event("broken", shard, pool.pids.get(actor)))
                        requeue_others(actor)
                        pool.replace(actor)
                    else:  # the actor, its process or its node is gone (with every shard it held)
                        log.warning("map actor died while on %s (worker or node lost); starting a replacement", shard,
                                    extra=_event("died", shard, pool.pids.get(actor)))
                        if pool.replace(actor):
                            pool.drop_dead_idle()  # a lost node takes its idle actors too: don't feed them shards
                    failed(shard, _short_error(e))
                    continue
                pool.give_back(actor)
                restart_clock(actor)
                result.done.append(stats)
                bar.add_images(stats["rows"])
                bar.shard_done(error_rows=sum(stats.get("errors", {}).values()))
        finally:
            bar.close()
            pool.kill_all([a for _, a, _ in inflight.values()])

    @staticmethod
    def _give_up(todo: deque, attempts: dict[str, int], result: MapResult, bar: Progress, why: str) -> None:
        log.error("%d shard(s) not mapped: %s", len(todo), why)
        while todo:
            shard = todo.popleft()
            result.failed.append(ShardFailure(shard, attempts[shard], why))
            bar.shard_done(failed=True)


def _event(kind: str, shard: str, pid: int | None) -> dict[str, Any]:
    """Fields on the executor's log records (``record.map_event`` …) for whoever watches them."""
    return {"map_event": kind, "shard": shard, "actor_pid": pid}


def _short_error(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
