"""One audit, start to finish: check resume safety → map missing shards → reduce → manifest."""

from __future__ import annotations

import datetime as dt
import logging
import platform
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from clipaudit.core.errors import ClipauditError
from clipaudit.data.storage import redact_text
from clipaudit.executors.base import MapResult
from clipaudit.executors.factory import make_executor
from clipaudit.io.outputs import OutputLayout, output_layout
from clipaudit.model.loading import check_hub_weights
from clipaudit.app.plan import check_name_coverage, device_here
from clipaudit.reduce import reduce_outputs
from clipaudit.reduce.options import ReduceOptions
from clipaudit.reduce.pipeline import reduce_changes
from clipaudit.core.hashing import sha256_file
from clipaudit.app.resolve import detect_device_type, fingerprint_hash, map_fingerprint, pinned
from clipaudit.spec import JobSpec
from clipaudit.io.downloads import collect_downloads
from clipaudit.model.files import content_fingerprint
from clipaudit.io.tables import duckdb_views
from clipaudit.data.urls import is_url
from clipaudit.data.storage import StorageError, last_stat, stat_urls
from clipaudit.app.audit import Audit
from clipaudit.data.shards import expand_shards

log = logging.getLogger(__name__)

_VERSIONED = ("clipaudit", "torch", "torchvision", "open_clip_torch", "ray", "faiss-cpu", "numpy",
              "pillow", "pyarrow", "duckdb", "pydantic")


class ResumeRefused(ClipauditError, RuntimeError):
    """The output folder holds results of a different job; ``--force`` recomputes."""


@dataclass
class RunReport:
    layout: OutputLayout
    shards: int
    skipped: int
    map: MapResult
    summary: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    reduced: bool = True  # False: nothing had changed, the earlier reduce's outputs were kept
    map_only: bool = False  # --map-only: the reduce step is left to `clipaudit reduce`

    @property
    def ok(self) -> bool:
        return not self.map.failed


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def reduce_options(spec: JobSpec) -> ReduceOptions:
    return ReduceOptions(attacks={name: getattr(spec.attacks, name) for name in spec.attacks.enabled()},
                         labels=spec.labels, names=spec.names, controls=spec.calibration.controls,
                         target_fpr=spec.calibration.target_fpr, fdr=spec.calibration.fdr, seed=spec.seed,
                         memory_limit=spec.compute.reduce_memory, storage_options=spec.data.storage_options)


_CHANGED_WORDS = {"model_files": "model_files (the content of a checkpoint or model-config file)"}


def resume_conflict(layout: OutputLayout, new: dict[str, Any]) -> str | None:
    """Why ``layout`` cannot be resumed by a job of map fingerprint ``new`` (it holds map results
    of a different job), or None. A folder whose earlier run wrote no result (e.g. it failed
    loading the model) holds nothing to protect."""
    state = layout.read_json(layout.job_state)
    if not isinstance(state, dict) or not layout.has_map_results():
        return None
    if state.get("map_hash") == fingerprint_hash(new):
        return None
    old = state.get("map_fingerprint", {})
    changed = [_CHANGED_WORDS.get(k, k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return (f"{layout.where} holds results of a different job (changed: {', '.join(changed) or 'unknown'}). "
            "Use --force to recompute them, or choose another output folder. "
            "Settings that only affect the reduce step (reduce-only attack parameters such as tau, labels, "
            "calibration) need no recompute: use `clipaudit reduce`.")


def check_resume(layout: OutputLayout, fingerprint: dict[str, Any], force: bool) -> None:
    """Refuse to mix outputs of different map settings unless forced (then clear them)."""
    conflict = resume_conflict(layout, fingerprint)
    if conflict is not None and not force:
        raise ResumeRefused(conflict)
    if conflict is not None:
        log.warning("--force: removing map outputs of a different job in %s", layout.where)
    if force:
        layout.clear_map_outputs()


def summarize(shards: list[str], failed: list, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-shard and total counts from the markers of the shards ``done`` (covers earlier runs
    too: those read before the map and those this run's workers wrote)."""
    per_shard, errors, warnings = [], Counter(), Counter()
    rows = ok = 0
    for s in shards:
        m = done.get(s)
        if m is None:
            continue
        per_shard.append({k: m.get(k, {}) for k in ("shard", "rows", "ok", "errors", "warnings")})
        rows += m["rows"]
        ok += m["ok"]
        errors.update(m["errors"])
        warnings.update(m.get("warnings", {}))
    return {
        "shards": len(shards), "shards_done": len(per_shard), "shards_failed": len(failed),
        "rows": rows, "ok": ok, "errors": dict(sorted(errors.items())),
        "warnings": dict(sorted(warnings.items())),
        "failed": [{"shard": f.shard, "attempts": f.attempts, "error": f.error} for f in failed],
        "per_shard": per_shard,
    }


def add_downloads(summary: dict[str, Any], layout: OutputLayout, shards: list[str], identity_field: str,
                  storage_options: dict[str, Any] | None = None) -> None:
    """Where the shards come with img2dataset's status files: the URLs missing from them
    (``downloads``: totals by status and reason; per shard ``downloads``: urls, missing)."""
    block, per_shard = collect_downloads(layout, shards, identity_field, storage_options)
    if block is None:
        return
    summary["downloads"] = block
    for entry in summary["per_shard"]:
        if entry["shard"] in per_shard:
            entry["downloads"] = per_shard[entry["shard"]]


def cross_shard_duplicate_keys(layout: OutputLayout) -> dict[str, int]:
    """Keys that occur in more than one shard. Both rows are kept (rows are identified by
    shard + key); the counts tell the auditor that the inputs hold repeated keys."""
    if not layout.store.glob(layout.samples_dir):
        return {"keys": 0, "rows": 0}
    con = duckdb_views(layout, ("samples",))
    try:
        keys, rows = con.execute(
            "SELECT count(*), coalesce(sum(n), 0) FROM (SELECT key, count(*) AS n FROM samples "
            "WHERE key IS NOT NULL GROUP BY key HAVING count(DISTINCT shard) > 1)"
        ).fetchone()
    finally:
        con.close()
    return {"keys": int(keys), "rows": int(rows)}


def _shard_info(shards: list[str], storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Path, size and (for an object on storage) ETag of every shard; a remote shard's as the
    spec check found them (listed again where this process did not check the spec)."""
    unseen = [s for s in shards if is_url(s) and last_stat(s) is None]
    if unseen:
        try:
            stat_urls(unseen, storage_options)
        except StorageError as e:
            log.warning("manifest: %s", e)
    out = []
    for s in shards:
        if is_url(s):
            info = last_stat(s) or {}
            out.append({"path": s, "bytes": info.get("bytes"), "etag": info.get("etag")})
        else:
            p = Path(s.removeprefix("file://"))
            out.append({"path": s, "bytes": p.stat().st_size if p.is_file() else None, "etag": None})
    return out


def write_manifest(layout: OutputLayout, spec: JobSpec, spec_text: str | None, shards: list[str],
                   started: str, summary: dict[str, Any], map_hash: str) -> None:
    pretrained = spec.model.pretrained
    ckpt = sha256_file(pretrained) if pretrained and Path(pretrained).is_file() else None
    layout.write_json(layout.manifest, {
        "clipaudit_manifest_version": 1,
        "spec": spec.public_json(),  # secret-like storage options redacted
        "spec_yaml": None if spec_text is None else redact_text(spec_text, spec.data.storage_options),
        "map_hash": map_hash,
        "model": {"name": spec.model.name, "pretrained": pretrained, "precision": spec.model.precision,
                  "checkpoint_sha256": ckpt},
        "shards": _shard_info(shards, spec.data.storage_options),
        "seeds": {"job": spec.seed},
        "versions": package_versions(),
        "host": {"platform": platform.platform(), "node": platform.node()},
        "started": started,
        "ended": _now(),
        "summary": {k: v for k, v in summary.items() if k != "per_shard"},
    })


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_job(spec: JobSpec, *, force: bool = False, progress: bool = True, spec_text: str | None = None,
            map_only: bool = False) -> RunReport:
    """Run (or resume) an audit; the map step only touches shards without a valid marker.
    ``map_only``: stop after the map step and its summary (the reduce step is then its own
    step, ``clipaudit reduce``, e.g. on a CPU node once the GPUs are released)."""
    if device_here(spec) is not None:  # compute.device: cuda without a GPU stops here, before any work
        for m in spec.model_specs().values():  # weights that cannot be downloaded: one line, at once
            check_hub_weights(m.name, m.pretrained)
    check_name_coverage(spec)  # a labelled or control name the pool lacks: exit 2 before any work
    spec = pinned(spec, detect_device_type(spec))  # every worker computes what the resume hash says
    if spec.compute.state_dir and not any(content_fingerprint(spec.model).values()):
        log.warning("compute.state_dir %s is shared by key, and the weights %s are keyed by their name, not their "
                    "content: if they change under that name (a hub repo in training), give each version its own "
                    "state_dir", spec.compute.state_dir, spec.model.pretrained or spec.model.name)
    layout = output_layout(spec.output, spec.data.storage_options)
    layout.store.warn_single_writer()
    with layout.lock() as lock:
        return _run_locked(layout, spec, force, progress, spec_text, exclusive=lock.held, map_only=map_only)


def _run_locked(layout: OutputLayout, spec: JobSpec, force: bool, progress: bool, spec_text: str | None,
                exclusive: bool, map_only: bool = False) -> RunReport:
    started = _now()
    fingerprint = map_fingerprint(spec)  # reads the name pool and hashes the model files: once per run
    check_resume(layout, fingerprint, force)
    layout.make_dirs()
    stale = layout.remove_stale_temps() if exclusive else 0  # without the lock they may be a live run's
    if stale:
        log.info("removed %d temp file(s) left by an interrupted run", stale)
    job_state = {"map_hash": fingerprint_hash(fingerprint), "map_fingerprint": fingerprint, "spec": spec.public_json()}
    if layout.read_json(layout.job_state) != job_state:
        layout.write_json(layout.job_state, job_state)
    shards = expand_shards(spec.data.shards)
    done = layout.finished(shards)  # one listing of the markers and parts, not a read per shard
    todo = [s for s in shards if s not in done]
    if len(todo) < len(shards):
        log.info("resume: %d of %d shards already done", len(shards) - len(todo), len(shards))
    opts = reduce_options(spec)
    if not todo and not map_only:
        changed = reduce_changes(layout, opts)
        summary = layout.read_json(layout.summary)
        if changed == [] and not stale and summary is not None and layout.store.is_file(layout.manifest):
            log.debug("nothing to do: every shard is done and the reduce step's outputs are up to date")
            metrics = layout.read_json(layout.metrics) or {}
            return RunReport(layout, len(shards), len(shards), MapResult(), summary, metrics, reduced=False)
        log.info("every shard is done; recomputing the reduce step: %s",
                 "no record of an earlier one" if changed is None
                 else "changed since the last one: " + ", ".join(changed))
    # hashed here once (name pool, weights), not by every actor
    result = make_executor(spec).run(spec, layout, todo, job_state["map_hash"], progress=progress)
    # the markers read before the map and those this run's workers wrote: nothing is read back
    summary = summarize(shards, result.failed, {**done, **{d["shard"]: d for d in result.done}})
    add_downloads(summary, layout, shards, spec.data.identity_field, spec.data.storage_options)
    summary["map_seconds_this_run"] = round(result.seconds, 3)
    summary["stale_temp_files_removed"] = stale
    # a scan of every part's keys: the reduce step's work (with --map-only, `clipaudit reduce` counts them)
    summary["duplicate_keys_across_shards"] = None if map_only else cross_shard_duplicate_keys(layout)
    layout.write_json(layout.summary, summary)
    metrics = reduce_outputs(layout, opts).metrics if summary["shards_done"] and not map_only else {}
    write_manifest(layout, spec, spec_text, shards, started, summary, job_state["map_hash"])
    return RunReport(layout, len(shards), len(shards) - len(todo), result, summary, metrics, map_only=map_only)


def complete_summary(layout: OutputLayout) -> None:
    """What a ``--map-only`` run left to the reduce step in ``_SUMMARY.json`` (the duplicate keys
    across shards), counted now."""
    summary = layout.read_json(layout.summary)
    if isinstance(summary, dict) and summary.get("duplicate_keys_across_shards", {}) is None:
        summary["duplicate_keys_across_shards"] = cross_shard_duplicate_keys(layout)
        layout.write_json(layout.summary, summary)


def reduce_mapped(layout: OutputLayout, opts: ReduceOptions):
    """The reduce step as its own step after ``run --map-only`` (``clipaudit reduce``; the caller
    holds the output's lock): the summary's counts the map-only run left, then the reduce."""
    complete_summary(layout)
    return reduce_outputs(layout, opts)


def saved_spec(layout: OutputLayout) -> JobSpec:
    """The spec an output folder was produced with (for ``clipaudit reduce``)."""
    return Audit.of(layout.store).saved_spec()
