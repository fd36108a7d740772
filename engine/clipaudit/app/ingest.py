"""``clipaudit ingest URLS OUT``: a ``url``, ``identity`` [, ``caption``] list (Parquet, CSV, TSV
or JSON lines) → WebDataset shards downloaded by img2dataset (used as a library), a name pool
and a starter job spec in OUT, ready for ``clipaudit run OUT/job.yaml``.

OUT holds img2dataset's own layout: ``NNNNN.tar`` shards, each with its ``NNNNN.parquet`` of
per-URL status rows (``clipaudit run`` turns them into the ``downloads`` table and counts the
failed URLs) and ``NNNNN_stats.json``. Re-running with the same list resumes: img2dataset skips
the shards it finished.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import signal
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipaudit.core.errors import ClipauditError
from clipaudit.core.hashing import sha256_file
from clipaudit.data.distractors import NamePool, NamePoolBuildError, build_name_pool
from clipaudit.data.samples import normalize_name

EXTRA_HINT = "pip install 'clipaudit[ingest]'"
REQUIRED_COLUMNS = ("url", "identity")
CAPTION_COLUMN = "caption"
RECORD = "_ingest.yaml"  # not .json: img2dataset reads every OUT/*.json as a finished shard's stats
#: img2dataset refuses images above this many pixels, as the audit does (data.max_image_pixels)
MAX_IMAGE_PIXELS = 89_478_485
_SHARD = re.compile(r"^(\d+)\.tar$")


class IngestError(ClipauditError, ValueError):
    """Bad input for ``clipaudit ingest`` (printed as one ``error:`` line, exit 2)."""


class MissingIngestExtra(IngestError):
    """img2dataset or Faker is not installed."""


@dataclass
class IngestOptions:
    """How to download and what to write (see ``clipaudit ingest --help``)."""

    pool_size: int = 1000
    seed: int = 0
    shard_size: int = 10_000
    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 0
    model: str | None = None  # None: the placeholder PLACEHOLDER_MODEL
    pretrained: str | None = None  # None: the placeholder PLACEHOLDER_PRETRAINED

    def placeholders(self) -> list[str]:
        """The starter job's model keys that hold a placeholder (not given by the user)."""
        return [key for key, given in (("model.name", self.model), ("model.pretrained", self.pretrained))
                if given is None]


#: what the starter job names where --model / --pretrained were not given
PLACEHOLDER_MODEL, PLACEHOLDER_PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"


@dataclass
class IngestResult:
    """What ``ingest`` wrote and how the downloads went (from img2dataset's per-shard stats)."""

    out: Path
    shards: list[str]
    urls: int
    success: int
    failed_by_status: dict[str, int]
    failed_by_reason: dict[str, int]
    unfinished: list[str]
    pool: NamePool
    job: Path
    names: Path
    job_kept: bool = False  # job.yaml existed (the user may have edited it): left as it was
    starter: Path | None = None  # with job_kept: this ingest's starter, written beside it where it differs
    placeholders: tuple[str, ...] = ()  # model keys of the starter that hold a placeholder

    @property
    def failed(self) -> int:
        return sum(self.failed_by_status.values())


def _downloader():
    """img2dataset's ``download``, or :class:`MissingIngestExtra` naming the extra."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else importing it asks PyPI for a newer version
    try:
        import faker  # noqa: F401
        from img2dataset import download
    except ImportError as e:
        raise MissingIngestExtra(f"clipaudit ingest needs img2dataset and Faker, the `ingest` extra "
                                 f"({type(e).__name__}: {e}): {EXTRA_HINT}") from None
    return download


def _read_table(path: Path) -> pa.Table:
    name = path.name.lower().removesuffix(".gz")
    as_text = {c: pa.string() for c in (*REQUIRED_COLUMNS, CAPTION_COLUMN)}
    try:
        if name.endswith(".parquet"):
            return pq.read_table(path)
        if name.endswith((".csv", ".tsv")):
            import pyarrow.csv as pcsv

            parse = pcsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
            return pcsv.read_csv(path, parse_options=parse, convert_options=pcsv.ConvertOptions(column_types=as_text))
        if name.endswith((".jsonl", ".ndjson", ".json")):
            import pyarrow.json as pjson

            return pjson.read_json(path)
    except (pa.ArrowException, OSError) as e:
        raise IngestError(f"cannot read the URL list {path}: {str(e).splitlines()[0]}") from None
    raise IngestError(f"{path}: unknown URL-list format (expected .parquet, .csv, .tsv or .jsonl, optionally .gz "
                      "for the text ones)")


def _strings(table: pa.Table, column: str, path: Path) -> list[str | None]:
    try:
        return table[column].cast(pa.string()).to_pylist()
    except (pa.ArrowException, NotImplementedError):
        raise IngestError(f"{path}: column {column!r} is {table.schema.field(column).type}, not text") from None


def _rows(bad: list[int]) -> str:
    shown = ", ".join(str(i) for i in bad[:5])
    return f"row{'s' if len(bad) > 1 else ''} {shown}{', …' if len(bad) > 5 else ''}"


def read_url_list(path: Path) -> pa.Table:
    """The list as a table of ``url``, ``identity`` (normalised) and ``caption`` (where given).
    A missing column, an empty URL or identity is an :class:`IngestError` naming it."""
    if not path.is_file():
        raise IngestError(f"URL list not found: {path}")
    table = _read_table(path)
    for column in REQUIRED_COLUMNS:
        if column not in table.column_names:
            raise IngestError(f"{path}: no {column!r} column (columns: {', '.join(table.column_names) or 'none'}); "
                              f"the URL list needs url and identity, caption is optional")
    if table.num_rows == 0:
        raise IngestError(f"{path}: the URL list has no rows")
    urls = [(u or "").strip() for u in _strings(table, "url", path)]
    identities = [normalize_name(i or "") for i in _strings(table, "identity", path)]
    for column, values in (("url", urls), ("identity", identities)):
        bad = [n + 1 for n, v in enumerate(values) if not v]
        if bad:
            raise IngestError(f"{path}: {len(bad)} row(s) with an empty {column!r} ({_rows(bad)}, counting data "
                              "rows from 1)")
    columns = {"url": urls, "identity": identities}
    if CAPTION_COLUMN in table.column_names:
        columns[CAPTION_COLUMN] = _strings(table, CAPTION_COLUMN, path)
    return pa.table(columns)


def _claim(out: Path, record: dict[str, Any]) -> None:
    """Make sure OUT is new, empty, or an earlier ingest of the same list; write the record."""
    import yaml

    path = out / RECORD
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        if {k: old.get(k) for k in ("sha256", "shard_size")} != {k: record[k] for k in ("sha256", "shard_size")}:
            raise IngestError(f"{out} holds shards of another URL list or shard size ({old.get('source')}, "
                              f"shard size {old.get('shard_size')}): choose a new folder")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IngestError(f"{out} is not empty and was not written by clipaudit ingest: choose a new or empty folder "
                          "(img2dataset writes its shards there)")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(record, sort_keys=False))


def _download(download, listing: Path, out: Path, has_caption: bool, opts: IngestOptions) -> None:
    """img2dataset's ``download`` into ``out``. It installs a SIGINT handler that exits with
    status 0; that exit is turned back into the interrupt it was, and the handler put back."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        download(url_list=str(listing), input_format="parquet", url_col="url",
                 caption_col=CAPTION_COLUMN if has_caption else None, save_additional_columns=["identity"],
                 output_folder=str(out), output_format="webdataset", number_sample_per_shard=opts.shard_size,
                 processes_count=opts.processes, thread_count=opts.threads, distributor="multiprocessing",
                 timeout=opts.timeout, retries=opts.retries, resize_mode="no", skip_reencode=True,
                 max_image_area=MAX_IMAGE_PIXELS, enable_wandb=False, incremental_mode="incremental")
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _shards(out: Path) -> dict[int, str]:
    found = {}
    for p in out.iterdir():
        m = _SHARD.match(p.name)
        if m:
            found[int(m.group(1))] = p.name
    return dict(sorted(found.items()))


def shard_pattern(names: list[str]) -> str | list[str]:
    """``{00000..00003}.tar`` for consecutive, equally wide shard names, else the list."""
    stems = [n.removesuffix(".tar") for n in names]
    if stems and len({len(s) for s in stems}) == 1 and [int(s) for s in stems] == list(
            range(int(stems[0]), int(stems[0]) + len(stems))):
        return f"{stems[0]}.tar" if len(stems) == 1 else f"{{{stems[0]}..{stems[-1]}}}.tar"
    return names


def _stats(out: Path, expected: int) -> tuple[Counter, Counter, list[int]]:
    """Totals over img2dataset's ``NNNNN_stats.json`` (count, successes, failed by status),
    the failure reasons, and the shard ids without stats (not finished)."""
    totals, reasons, unfinished = Counter(), Counter(), []
    stats = {int(p.name.split("_")[0]): p for p in out.glob("*_stats.json") if p.name.split("_")[0].isdigit()}
    for shard_id in range(expected):
        if shard_id not in stats:
            unfinished.append(shard_id)
            continue
        s = json.loads(stats[shard_id].read_text())
        totals.update({k: int(s.get(k) or 0) for k in ("count", "successes", "failed_to_download",
                                                          "failed_to_resize")})
        reasons.update({k: int(v) for k, v in (s.get("status_dict") or {}).items() if k != "success"})
    return totals, reasons, unfinished


def starter_job(out: Path, pattern: str | list[str], opts: IngestOptions, pool: NamePool, source: Path) -> str:
    """The text of ``OUT/job.yaml``: the shards, the pool, a placeholder model, default attacks."""
    import yaml

    def local(value: str | None) -> str | None:  # a file named from the current folder, not from OUT's
        return str(Path(value).resolve()) if value and Path(value).is_file() else value

    spec = {
        "model": {"name": local(opts.model) if opts.model is not None else PLACEHOLDER_MODEL,
                  "pretrained": local(opts.pretrained) if opts.pretrained is not None else PLACEHOLDER_PRETRAINED},
        "data": {"shards": pattern, "identity_field": "identity"},
        "names": "names.txt",
        "output": f"../{out.resolve().name}-audit",
    }
    header = (
        f"# Starter job written by `clipaudit ingest` from {source.name} "
        f"({dt.datetime.now(dt.UTC).date().isoformat()}).\n"
        + (f"# {' and '.join(opts.placeholders())}: a placeholder: set it to the CLIP model you audit.\n"
           if opts.placeholders() else "# model: as --model/--pretrained named it.\n") +
        "# data.shards: img2dataset's shards beside this file; URLs that failed to download are counted by\n"
        "#   `clipaudit run` (_SUMMARY.json) and listed in the `downloads` view of `clipaudit query`.\n"
        f"# names: the {pool.n_true} identities plus {len(pool.names) - pool.n_true} generated distractors "
        f"(seed {opts.seed}).\n"
        "# Add `labels: labels.csv` (identity,member) for metrics, `attacks:` / `compute:` as in docs/job-spec.md.\n"
        "# Check: clipaudit run job.yaml --dry-run   Run: clipaudit run job.yaml\n"
    )
    return header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def ingest(urls: Path, out: Path, opts: IngestOptions | None = None) -> IngestResult:
    """Download ``urls`` into shards under ``out`` and write ``names.txt`` and ``job.yaml`` there."""
    opts = opts or IngestOptions()
    for name in ("pool_size", "shard_size", "processes", "threads", "timeout", "retries"):
        least = 0 if name == "retries" else 1
        if getattr(opts, name) < least:
            raise IngestError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(opts, name)}")
    download = _downloader()
    table = read_url_list(urls)
    try:
        pool = build_name_pool(table["identity"].to_pylist(), opts.pool_size, opts.seed)
    except NamePoolBuildError as e:
        raise IngestError(str(e)) from None
    _claim(out, {"source": str(urls.resolve()), "sha256": sha256_file(urls), "rows": table.num_rows,
                 "shard_size": opts.shard_size})
    with tempfile.TemporaryDirectory(prefix="clipaudit-ingest-") as tmp:
        listing = Path(tmp) / "urls.parquet"
        pq.write_table(table, listing)
        _download(download, listing, out, CAPTION_COLUMN in table.column_names, opts)

    expected = math.ceil(table.num_rows / opts.shard_size)
    totals, reasons, unfinished = _stats(out, expected)
    shards = [name for i, name in _shards(out).items() if i < expected and i not in unfinished]
    names_path, job_path = out / "names.txt", out / "job.yaml"
    names_path.write_text("\n".join(pool.names) + "\n", encoding="utf-8")
    pattern = shard_pattern(shards) if shards else [f"{i:05d}.tar" for i in range(expected)]
    job_kept, starter = _write_starter(job_path, starter_job(out, pattern, opts, pool, urls))
    by_status = {k: totals[k] for k in ("failed_to_download", "failed_to_resize") if totals[k]}
    return IngestResult(out=out, shards=shards, urls=table.num_rows, success=totals["successes"],
                        failed_by_status=by_status, failed_by_reason=dict(reasons.most_common()),
                        unfinished=[f"{i:05d}.tar" for i in unfinished], pool=pool, job=job_path, names=names_path,
                        job_kept=job_kept, starter=starter, placeholders=tuple(opts.placeholders()))


STARTER = "job.starter.yaml"


def _write_starter(job_path: Path, text: str) -> tuple[bool, Path | None]:
    """Write the starter job as ``job.yaml`` unless that exists: a user's file is never
    overwritten. Where it exists and says something else than this ingest's starter (e.g. the
    user set the model), the starter goes beside it as ``job.starter.yaml``. Returns (kept, the
    starter written beside it or None)."""
    import yaml

    if not job_path.exists():
        job_path.write_text(text, encoding="utf-8")
        return False, None
    beside = job_path.with_name(STARTER)
    try:
        same = yaml.safe_load(job_path.read_text(encoding="utf-8")) == yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError):
        same = False
    if same:
        beside.unlink(missing_ok=True)
        return True, None
    beside.write_text(text, encoding="utf-8")
    return True, beside


def result_lines(r: IngestResult) -> list[str]:
    """What ``clipaudit ingest`` prints."""
    reasons = ", ".join(f"{k}={v}" for k, v in list(r.failed_by_reason.items())[:10])
    lines = [f"ingest: {r.urls} URLs → {r.success} images in {len(r.shards)} shard(s) under {r.out}"]
    if r.failed:
        status = ", ".join(f"{k}={v}" for k, v in r.failed_by_status.items())
        lines.append(f"failed: {r.failed} URLs ({status}); reasons: {reasons} — `clipaudit run` counts them, "
                     "the `downloads` view lists them")
    if r.unfinished:
        lines.append(f"UNFINISHED shards (no img2dataset stats): {', '.join(r.unfinished)} — run the same command "
                     "again to resume")
    locales = ", ".join(f"{k}={v}" for k, v in r.pool.by_locale.items()) or "none"
    lines.append(f"names: {r.names} ({len(r.pool.names)} names: {r.pool.n_true} identities + "
                 f"{len(r.pool.names) - r.pool.n_true} distractors; by locale: {locales})")
    if r.job_kept and r.starter is not None:
        lines.append(f"job: {r.job} kept as it was (it differs from this ingest's starter, written to {r.starter}: "
                     "compare data.shards and names with yours)")
    elif r.job_kept:
        lines.append(f"job: {r.job} kept as it was")
    elif r.placeholders:
        lines.append(f"job: {r.job} (set {' / '.join(r.placeholders)} to the model you audit)")
    else:
        lines.append(f"job: {r.job}")
    lines.append(f"next: clipaudit run {r.job} --dry-run, then clipaudit run {r.job}")
    return lines
