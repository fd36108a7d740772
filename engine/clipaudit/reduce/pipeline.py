"""The reduce step: Parquet parts → identities.parquet (+ calibration with controls, + metrics
with labels). Reads only the outputs (no model, no GPU), so it can be re-run with other
reduce-only settings (e.g. a vote's threshold), labels or controls.

Steps, one module each: :mod:`.identities` (one row per identity), :mod:`.labels` (labels
and controls), :mod:`.conformal` (p-values, thresholds, flags), :mod:`.evaluation` (metrics
per attack and level, with :mod:`.statistics` and :mod:`.learned`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import pyarrow as pa

from clipaudit import __version__
from clipaudit.contract.registry import registered, scores
from clipaudit.core.threads import bounded_threads
from clipaudit.data.urls import is_url
from clipaudit.data.storage import open_url
from clipaudit.io.outputs import OutputLayout
from clipaudit.contract.schemas import load_schema
from clipaudit.core.hashing import sha256_file
from clipaudit.reduce.attackers import LearnedScores, score_candidates
from clipaudit.reduce.attackers import load as load_attackers
from clipaudit.reduce.attackers import save as save_attackers
from clipaudit.reduce.conformal import METHOD, controls_in_words, write_sample_pvalues
from clipaudit.reduce.evaluation import evaluation_tables, evaluate
from clipaudit.reduce.identities import IdentityLevel, identity_level
from clipaudit.reduce.tables import REDUCE_MEMORY, connect
from clipaudit.data.labels import Controls, Labels, ShardMatcher, control_set, read_labels
from clipaudit.reduce.neighbours import Copies
from clipaudit.reduce.options import ReduceOptions
from clipaudit.io.outputs import no_audit
from clipaudit.reduce.neighbours import near_duplicates, reference_matches

log = logging.getLogger(__name__)


@dataclass
class ReduceResult:
    """What the reduce step wrote and found."""

    identities: pa.Table
    metrics: dict[str, Any] = field(default_factory=dict)  # empty without labels
    calibration: dict[str, Any] | None = None  # None without controls
    written: list[Path] = field(default_factory=list)


def reduce_outputs(layout: OutputLayout, opts: ReduceOptions) -> ReduceResult:
    """Write identities.parquet; with controls (a controls file or labelled non-members) also
    calibration.json and sample_scores/; with labels also metrics.json + roc.parquet. Numerical
    libraries run with bounded threads (:mod:`clipaudit.core.threads`)."""
    layout.store.remove(layout.reduce_state)  # an interrupted reduce leaves no claim to be current
    with bounded_threads():
        result = _reduce(layout, opts)
    inputs = reduce_inputs(layout, opts)
    if inputs is not None:
        layout.write_json(layout.reduce_state, {"inputs": inputs})
    return result


def _content_sha256(path: Path | str | None, storage_options: Mapping[str, Any]) -> str | None:
    if path is None:
        return None
    if isinstance(path, str) and is_url(path):
        with open_url(path, "rb", storage_options) as f:
            return hashlib.sha256(f.read()).hexdigest()
    p = Path(path)
    if p.is_dir():  # another audit's attackers/: every JSON file in it
        return hashlib.sha256(b"".join(f.name.encode() + bytes.fromhex(sha256_file(f))
                                       for f in sorted(p.glob("*.json")))).hexdigest()
    return sha256_file(p)


def reduce_inputs(layout: OutputLayout, opts: ReduceOptions) -> dict[str, Any] | None:
    """Everything the reduce step's results depend on: its settings, the content of the files
    it reads (labels, controls, names, attackers, reference index) and the finished shards'
    markers. Equal inputs give equal outputs, so ``clipaudit run`` on a finished folder can
    skip the reduce. None when a file cannot be read (then the reduce is never skipped)."""
    try:
        files = {key: _content_sha256(getattr(opts, key), opts.storage_options)
                 for key in ("labels", "controls", "names", "attackers", "reference")}
    except (OSError, ValueError):
        return None
    try:  # the markers' names and sizes from one listing: a shard is mapped again only after its marker
        # went (a failed or removed part) or with --force, which removes this record too
        markers = sorted((p.name, size) for p, size in layout.store.files(layout.markers_dir).items()
                         if p.name.endswith(".done.json"))
    except OSError:
        return None
    return {
        "attacks": {name: params.model_dump(mode="json") for name, params in opts.attacks.items()},  # type: ignore[union-attr]
        "files": files,
        "settings": {"target_fpr": opts.target_fpr, "fdr": opts.fdr, "seed": opts.seed,
                     "near_duplicates": opts.near_duplicates},
        "shards": hashlib.sha256(json.dumps(markers).encode()).hexdigest(),
        "clipaudit": __version__,
    }


def reduce_changes(layout: OutputLayout, opts: ReduceOptions) -> list[str] | None:
    """What changed since the last reduce step wrote its outputs: [] when nothing did (its
    outputs are current), None when there is no record of it (never reduced, or interrupted)."""
    state = layout.read_json(layout.reduce_state)
    if not isinstance(state, dict) or not isinstance(state.get("inputs"), dict) \
            or not layout.store.is_file(layout.identities):
        return None
    before = state["inputs"]
    now = reduce_inputs(layout, opts)
    if now is None:
        return ["an input file could not be read to compare"]
    changed = []
    for group, words in (("attacks", "attack parameters"), ("settings", "calibration or reduce settings"),
                         ("shards", "finished shards"), ("clipaudit", "clipaudit version")):
        if before.get(group) != now[group]:
            changed.append(words)
    changed += [f"{key} file" for key in now["files"] if (before.get("files") or {}).get(key) != now["files"][key]]
    return changed


def _reduce(layout: OutputLayout, opts: ReduceOptions) -> ReduceResult:
    if not layout.store.glob(layout.samples_dir):
        raise FileNotFoundError(no_audit(layout.where, "samples/*.parquet"))
    matcher = ShardMatcher(_audited_shards(layout, opts.memory_limit))
    labels = read_labels(opts.labels, opts.storage_options).matched(matcher) if opts.labels else None
    if labels is not None and labels.unmatched_images:
        log.warning("labels: %d image row(s) name no audited shard", labels.unmatched_images)
    controls = control_set(opts.controls, labels, matcher, opts.storage_options)
    neighbour_files = _neighbours(layout, opts)
    if opts.near_duplicates:
        from dataclasses import replace

        opts = replace(opts, copies=layout.root / NEAR_DUPLICATES)
    t0 = time.perf_counter()
    ident = identity_level(layout, opts, labels, controls)
    layout.write_table(layout.identities, ident.table)
    result = ReduceResult(ident.table, written=[layout.identities, *neighbour_files])
    log.info("%d identities in %.1f s", ident.table.num_rows, time.perf_counter() - t0)
    copies = Copies.load(opts.copies, layout.store)  # read once: the attackers, the p-values and the metrics skip them
    learned = _learned_scores(layout, opts, labels, controls, copies)
    result.calibration = _calibrate(layout, opts, controls, ident.calibration, ident.table, learned, copies)
    if result.calibration is not None:
        result.written.append(layout.calibration)
    if labels is None:
        layout.store.remove(layout.metrics, layout.roc)
        return result
    result.metrics = _evaluate(layout, opts, labels, ident, copies)
    result.written.append(layout.metrics)
    return result


def _say_sampled(con, opts: ReduceOptions, metrics: dict[str, Any]) -> None:
    """An image score whose attack scored a sample (``attacks.<name>.sample``) says so in its entry."""
    for attack in registered():
        sample = getattr(opts.attacks.get(attack.name), "sample", None)
        if attack.name not in opts.enabled or sample is None:
            continue
        for score in attack.image_scores():
            n, scored = con.execute(f"SELECT count(*), count({score.name}_score) FROM ok").fetchone()
            if isinstance(metrics.get(score.name), dict):
                metrics[score.name]["sample"] = {
                    "per_identity": sample.per_identity, "scored_images": int(scored), "ok_images": int(n),
                    "note": f"{attack.name} scored a sample: up to {sample.per_identity} image(s) per identity and "
                            "shard, every image of labelled and control identities; its metrics, p-values and "
                            "learned attackers use the scored images only"}


NEAR_DUPLICATES = "near_duplicates.parquet"
REFERENCE_MATCHES = "reference_matches.parquet"


def _neighbours(layout: OutputLayout, opts: ReduceOptions) -> list[Path]:
    """near_duplicates.parquet and reference_matches.parquet when asked for; stale ones go."""
    written = []
    for name, wanted, make in (
            (NEAR_DUPLICATES, opts.near_duplicates,
             lambda p: near_duplicates(layout, p, memory_limit=opts.memory_limit)),
            (REFERENCE_MATCHES, opts.reference is not None, lambda p: reference_matches(layout, opts.reference, p))):
        path = layout.root / name
        if not wanted:
            layout.store.remove(path)
            continue
        t0 = time.perf_counter()
        rows = make(path)
        log.info("%s: %d rows in %.1f s", name, rows, time.perf_counter() - t0)
        written.append(path)
    return written


def _audited_shards(layout: OutputLayout, memory_limit: str = REDUCE_MEMORY) -> list[str]:
    """The shards whose rows are in ``samples/``, as their ``shard`` column names them."""
    con = connect(layout, memory_limit=memory_limit)
    try:
        return [r[0] for r in con.execute("SELECT DISTINCT shard FROM samples").fetchall()]
    finally:
        con.close()


def _learned_scores(layout: OutputLayout, opts: ReduceOptions, labels: Labels | None,
                    controls: Controls, copies: Copies | None = None) -> LearnedScores:
    """Learned attackers' scores for every ok sample: fitted on the labels, or weakly on the
    controls without labels (and saved under attackers/), or applied from ``opts.attackers``;
    stale attackers go when nothing was fitted."""
    t0 = time.perf_counter()
    if opts.attackers is not None:
        learned = score_candidates(layout, dict(opts.attacks), None, load_attackers(Path(opts.attackers) / "attackers"))
        log.info("applied %d attacker(s) from %s in %.1f s", len(learned.names), opts.attackers,
                 time.perf_counter() - t0)
        return learned
    learned = score_candidates(layout, dict(opts.attacks), labels, seed=opts.seed, controls=controls,
                               copies=copies)
    if learned.fitted:
        save_attackers(learned.fitted, layout)
        log.info("fitted %d attacker(s) on %s in %.1f s", len(learned.fitted),
                 "the labels" if labels is not None else "the controls and pseudo-members (weak supervision)",
                 time.perf_counter() - t0)
    else:
        layout.store.remove_tree(layout.attackers_dir)
    return learned


def _calibrate(layout: OutputLayout, opts: ReduceOptions, controls: Controls, identity: dict[str, Any],
               identities: pa.Table, learned: LearnedScores, copies: Copies | None = None
               ) -> dict[str, Any] | None:
    """sample_scores/ (with controls or learned scores) and calibration.json (with controls);
    removes stale ones without."""
    t0 = time.perf_counter()
    image_scores = [s.name for s in scores(opts.enabled, "image")]
    if (controls and image_scores) or learned.names:
        image = write_sample_pvalues(layout, image_scores if controls else [], controls, opts.target_fpr,
                                     load_schema("sample_scores", opts.enabled), learned, fdr=opts.fdr,
                                     copies=copies)
    else:  # nothing to write per image (no controls and no learned scores, or an identity-level job)
        layout.store.remove_tree(layout.sample_scores_dir)
        image = {}
    if not controls:
        layout.store.remove(layout.calibration)
        return None
    seen = set(identities.column("identity").to_pylist())
    # image controls: the listed images plus every image of a control identity (Controls.mask)
    images_used = max((e.get("n_controls", 0) for e in image.values()), default=0)
    calibration: dict[str, Any] = {
        "target_fpr": opts.target_fpr,
        "fdr": opts.fdr,
        "controls": {"sources": controls.sources, "identities": len(controls.identities),
                     "identities_in_candidates": len(controls.identities & seen), "images": len(controls.images),
                     "images_used": images_used},
        "method": METHOD,
    }
    if identity:
        calibration["identity"] = identity
    if image:
        calibration["image"] = image
    layout.write_json(layout.calibration, calibration)
    log.info("calibration in %.1f s: %s", time.perf_counter() - t0, controls_in_words(calibration["controls"]))
    return calibration


def _evaluate(layout: OutputLayout, opts: ReduceOptions, labels: Labels, ident: IdentityLevel,
              copies: Copies | None = None) -> dict[str, Any]:
    """metrics.json and roc.parquet; each attack's own analysis (e.g. a sweep) joins its entry."""
    identities = ident.table
    con = connect(layout, opts.copies, opts.memory_limit)  # with --near-duplicates, copies are not evaluated
    tables = evaluation_tables(con, identities, labels, opts, ident.excluded, ident.draws, ident.pool)
    t0 = time.perf_counter()
    log.info("metrics with bootstrap intervals for %s level(s), %d labelled units",
             "+".join(t.level for t in tables), sum(len(t.labels) for t in tables))
    metrics, roc_rows = evaluate(tables)
    _say_sampled(con, opts, metrics)
    con.close()
    for name, extra in ident.analyses.items():
        if isinstance(metrics.get(name), dict):
            metrics[name].update(extra)
    log.info("metrics in %.1f s", time.perf_counter() - t0)
    seen = set(identities.column("identity").to_pylist())
    if copies is not None:
        metrics["near_duplicates"] = {
            "copies": len(copies),
            "note": "near-duplicate copies (near_duplicates.parquet) are left out of every figure: identity votes "
                    "and means, image-level metrics, learned attackers' fits, the blind baseline and the image "
                    "p-values' controls and q-values"}
    metrics["n_unlabeled_identities"] = sum(v is None for v in identities.column("label_member").to_pylist())
    metrics["n_labels_not_in_candidates"] = len(set(labels.identities) - seen)
    metrics["n_image_labels_not_in_candidates"] = labels.unmatched_images
    layout.write_json(layout.metrics, metrics)
    layout.write_table(layout.roc, pa.Table.from_pylist(roc_rows, schema=load_schema("roc")))
    return metrics
