"""``clipaudit bench --reduce ROWS,ROWS…``: the reduce step's peak memory and time on synthetic
output folders of growing size, measured side by side in one run.

:func:`synthetic_audit` writes an output folder as the map step would leave it — ``samples/``
parts that follow the published schema (IDIA ranks and top-1 names over 21 templates, one
image-side attack's score and 45-value feature vector (:func:`image_attack`), caption score,
difference hash, a few error rows),
identities with ~100 images each, half of them "members" whose true name wins more often —
plus a labels file (identity rows for 1 % of the identities) and a controls file (another 1 %
of non-members). Each size's reduce then runs in its own spawned process (labels, controls,
IDIA sweep, learned attackers, sample p-values), which reports its peak resident set.

The numbers are synthetic: they measure memory and time, never attack quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
from clipaudit.spec import REDUCE_MEMORY
from clipaudit.contract.registry import available
from clipaudit.contract.schemas import load_schema
from clipaudit.bench.quick import peak_rss_mb
from clipaudit.io.outputs import OutputLayout
from clipaudit.reduce import reduce_outputs
from clipaudit.reduce.options import ReduceOptions
from clipaudit.bench.map_step import machine

TEMPLATES = 21
FEATURES = 45  # values in the image-side attack's feature vector (e.g. 45 pairwise cosines of 10 views)
IMAGES_PER_IDENTITY = 100
ROWS_PER_PART = 50_000  # ~ one img2dataset shard of 10,000 images ×5; parts are per shard in real runs
LABELLED_SHARE = 0.01  # identities in the labels file
CONTROL_SHARE = 0.01  # identities in the controls file (non-members, not labelled)
DISTRACTORS = 1000


def image_attack():
    """The image-side attack the synthetic audit fills: the first built-in one (by name) that has
    a feature vector for learned attackers."""
    return min((a for a in available() if a.features and a.learned), key=lambda a: a.name)


def attacks() -> tuple[str, ...]:
    """The attacks of the synthetic audit: IDIA, the image-side one, caption."""
    return ("idia", image_attack().name, "caption")


def _identity_names(n: int) -> list[str]:
    return [f"person {i:07d}" for i in range(n)]


def synthetic_audit(folder: Path, rows: int, seed: int = 0, rows_per_part: int = ROWS_PER_PART) -> dict[str, Path]:
    """Write ``folder/samples/*.parquet`` (``rows`` rows), ``folder/labels.csv``,
    ``folder/controls.csv`` and ``folder/names.txt``; returns those paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq


    rng = np.random.default_rng(seed)
    schema = load_schema("samples", attacks())
    image = image_attack()
    n_ident = max(rows // IMAGES_PER_IDENTITY, 4)
    idents = _identity_names(n_ident)
    member = rng.random(n_ident) < 0.5
    pool = idents + [f"distractor {i:05d}" for i in range(DISTRACTORS)]
    pool_arr = pa.array(pool)
    samples = folder / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for p, start in enumerate(range(0, rows, rows_per_part)):
        n = min(rows_per_part, rows - start)
        row = np.arange(start, start + n)
        ident = (row * n_ident) // rows  # contiguous identities, ~IMAGES_PER_IDENTITY rows each
        error = rng.random(n) < 0.005
        hit_p = np.where(member[ident], 0.55, 0.02)
        hit = rng.random((n, TEMPLATES)) < hit_p[:, None]
        other = rng.integers(0, len(pool), (n, TEMPLATES))
        top1 = np.where(hit, ident[:, None], other)
        rank = np.where(hit, 1, rng.integers(2, 60, (n, TEMPLATES))).astype(np.int32)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * TEMPLATES, type=pa.int32())
        mask = pa.array(error)
        lists = {
            "idia_top1": pa.ListArray.from_arrays(offsets, pool_arr.take(pa.array(top1.ravel())), mask=mask),
            "idia_true_rank": pa.ListArray.from_arrays(offsets, pa.array(rank.ravel()), mask=mask),
        }
        cos = np.sort(rng.normal(np.where(member[ident], 0.82, 0.8)[:, None], 0.05, (n, FEATURES)), axis=1)
        feat_off = pa.array(np.arange(n + 1, dtype=np.int32) * FEATURES, type=pa.int32())
        lists[image.features] = pa.ListArray.from_arrays(feat_off, pa.array(cos.ravel().astype(np.float32)),
                                                               mask=mask)
        shard = f"synthetic/{p:06d}.tar"
        values: dict[str, Any] = {
            "shard": pa.array([shard] * n), "key": pa.array([f"{p:06d}{i:06d}" for i in range(n)]),
            "position": pa.array(np.arange(n, dtype=np.int32)),
            "identity": pa.array(idents).take(pa.array(ident)),
            "status": pa.array(np.where(error, "error", "ok")),
            "error": pa.array(np.where(error, "decode_error", None).tolist(), type=pa.string()),
            "width": pa.array(np.full(n, 256, dtype=np.int32)), "height": pa.array(np.full(n, 256, dtype=np.int32)),
            "has_caption": pa.array(np.zeros(n, dtype=bool)),
            f"{image.image_scores()[0].name}_score": pa.array(cos.mean(1).astype(np.float32), mask=error),
            "caption_score": pa.array(rng.normal(0.3, 0.05, n).astype(np.float32), mask=error),
            "dhash": pa.array(rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64), mask=error),
            **lists,
        }
        arrays = [values.get(f.name, pa.nulls(n, f.type)).cast(f.type) for f in schema]
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), samples / f"part-{p:06d}.parquet")
    order = rng.permutation(n_ident)
    n_lab, n_ctl = max(int(n_ident * LABELLED_SHARE), 2), max(int(n_ident * CONTROL_SHARE), 2)
    labelled = order[:n_lab]
    controls = [i for i in order[n_lab:] if not member[i]][:n_ctl]
    paths = {"labels": folder / "labels.csv", "controls": folder / "controls.csv", "names": folder / "names.txt"}
    paths["labels"].write_text("identity,member\n" + "".join(f"{idents[i]},{str(bool(member[i])).lower()}\n"
                                                             for i in labelled))
    paths["controls"].write_text("identity\n" + "".join(f"{idents[i]}\n" for i in controls))
    paths["names"].write_text("\n".join(pool) + "\n")
    return paths


def _child_reduce(folder: str, memory_limit: str, results) -> None:
    """In a spawned process: reduce ``folder`` with labels and controls; report seconds, peak
    RSS, and the peak RSS so far at each of the reduce step's log lines (its stages)."""
    import logging


    stages: list[tuple[str, float]] = []

    class Stage(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stages.append((record.getMessage()[:60], round(peak_rss_mb())))

    logger = logging.getLogger("clipaudit.reduce")
    logger.setLevel(logging.INFO)
    logger.addHandler(Stage())
    root = Path(folder)
    opts = ReduceOptions(attacks=attacks(), labels=root / "labels.csv", controls=root / "controls.csv",
                         names=root / "names.txt", memory_limit=memory_limit)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    result = reduce_outputs(OutputLayout(root), opts)
    results.put({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "start_rss_mb": before,
                 "identities": result.identities.num_rows, "stages": stages})


def measure(folder: Path, memory_limit: str = REDUCE_MEMORY) -> dict[str, Any]:
    """Reduce ``folder`` in a fresh process; its seconds, peak RSS (MB), identity count and
    peak RSS after each logged stage."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child_reduce, args=(str(folder), memory_limit, results))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"reduce child process failed (exit {proc.exitcode})")
    return results.get(timeout=5)


def run_reduce_bench(sizes: list[int], workdir: Path, seed: int = 0, memory_limit: str = REDUCE_MEMORY,
                     log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Peak RSS and time of the reduce step at each size (rows) with DuckDB capped at
    ``memory_limit``, plus the largest size's RSS over the smallest's (``reduce_rss_growth``:
    1.0 is flat; the cap bounds it — DuckDB uses up to its limit before it spills)."""
    import shutil


    out: dict[str, Any] = {"device": machine("cpu"), "reduce_memory_limit": memory_limit, "reduce_rows": [],
                           "reduce_seconds": [], "reduce_rows_per_s": [], "reduce_peak_rss_mb": [],
                           "reduce_identities": []}
    for rows in sorted(sizes):
        folder = workdir / f"reduce-{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        synthetic_audit(folder, rows, seed)
        log(f"{rows:,} synthetic rows written in {time.perf_counter() - t0:.0f} s; reducing")
        found = measure(folder, memory_limit)
        log(f"{rows:,} rows reduced in {found['seconds']:.0f} s, peak RSS {found['peak_rss_mb']:.0f} MB")
        out["reduce_rows"].append(rows)
        out["reduce_seconds"].append(round(found["seconds"], 1))
        out["reduce_rows_per_s"].append(round(rows / found["seconds"]))
        out["reduce_peak_rss_mb"].append(round(found["peak_rss_mb"]))
        out["reduce_identities"].append(found["identities"])
        out.setdefault("reduce_start_rss_mb", []).append(round(found["start_rss_mb"]))
        out.setdefault("reduce_stage_peak_rss_mb", []).append(found["stages"])
        shutil.rmtree(folder, ignore_errors=True)
    out["reduce_rss_growth"] = round(out["reduce_peak_rss_mb"][-1] / out["reduce_peak_rss_mb"][0], 3)
    return out


if __name__ == "__main__":  # pragma: no cover - a manual entry point beside the CLI
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run_reduce_bench([int(x) for x in sys.argv[2:]], Path(d), memory_limit=sys.argv[1],
                                          log=print)))
