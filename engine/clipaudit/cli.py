"""``clipaudit`` command line: run | reduce | demo | query | report | ingest | bench.

Exit codes: 0 success; 1 some shards failed after all retries; 2 bad input (spec, files,
model, query) with one clear message and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from clipaudit.core.errors import ClipauditError
from clipaudit.spec import REDUCE_MEMORY, CalibrationSpec, ComputeSpec

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_BAD_INPUT = 0, 1, 2


class UserError(ClipauditError):
    """Printed as ``error: <message>`` with exit code 2."""


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("clipaudit").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if not os.environ.get("RAY_ADDRESS"):
        # a local Ray started by this command: Ray's token-auth notice (logged by ray.init when
        # RAY_AUTH_MODE is unset) asks for nothing a local run needs; a cluster keeps Ray's own choice
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _open_output(output_dir: str, storage_options: str | None):
    """The layout of a local output folder, or of an output URL (s3://, gs://, …) read and written
    on its store; an output URL that holds no audit is an error."""
    from clipaudit.data.urls import is_url
    from clipaudit.io.outputs import output_layout

    options = _storage_options(output_dir, storage_options)
    if not is_url(output_dir):
        return output_layout(Path(output_dir))
    layout = output_layout(output_dir, options)
    if not (layout.store.is_file(layout.summary) or layout.store.is_file(layout.job_state)):
        raise UserError(f"{layout.where} holds no audit (no _SUMMARY.json or _job.json there)")
    return layout


def _storage_options(output_dir: str, text: str | None) -> dict:
    """``--storage-options`` (a JSON object) for an output URL; an error beside a local folder."""
    from clipaudit.data.urls import is_url

    if text is None:
        return {}
    if not is_url(output_dir):
        raise UserError("--storage-options is for an output on object storage (s3://, gs://, …)")
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--storage-options: not JSON ({e})") from None
    if not isinstance(options, dict):
        raise UserError('--storage-options: a JSON object, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    return options


def _unwrap(e: BaseException) -> BaseException:
    """Ray wraps exceptions raised in tasks; surface the original one."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


# -- run ------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from clipaudit.app.runner import run_job
    from clipaudit.app.jobs import load_job

    if args.bench and not args.dry_run:
        raise UserError("--bench is read by --dry-run only (for its time estimate)")
    if args.deadline_h is not None and not args.bench:
        raise UserError("--deadline-h sizes the map step from a benched rate: give --dry-run --bench BENCH_JSON too")
    if args.deadline_h is not None and args.deadline_h <= 0:
        raise UserError(f"--deadline-h must be a positive number of hours, got {args.deadline_h:g}")
    spec = load_job(args.job, need_backends=not args.dry_run)  # a dry run contacts no storage
    if args.output:
        from clipaudit.data.urls import is_url

        spec = spec.model_copy(update={"output": args.output if is_url(args.output) else Path(args.output).resolve()})
    if args.dry_run:
        return _dry_run(args, spec)
    from clipaudit.report.text import print_report

    report = run_job(spec, force=args.force, progress=not (args.no_progress or args.quiet),
                     spec_text=Path(args.job).read_text(), map_only=args.map_only)
    print_report(report)
    if args.map_only and not args.quiet:
        print(f"map step done; the reduce step: clipaudit reduce {report.layout.where}")
    if not args.quiet and report.layout.store.is_file(report.layout.identities):
        print(f'query: clipaudit query {report.layout.where} "{_example_query(spec.attacks.enabled())}"')
    return EXIT_OK if report.ok else EXIT_FAILED_SHARDS


def _dry_run(args: argparse.Namespace, spec) -> int:
    """Validate, print the plan and the inputs that cannot be checked from here; run nothing."""
    from clipaudit.data.urls import is_url
    from clipaudit.io.outputs import OutputLayout
    from clipaudit.app.plan import format_plan, make_plan, read_bench
    from clipaudit.app.runner import resume_conflict
    from clipaudit.data.shards import expand_shards

    shards = expand_shards(spec.data.shards)
    layout = OutputLayout(Path(spec.output)) if not spec.output_is_remote() else None
    done = 0 if layout is None else len(layout.finished(shards))
    plan = make_plan(spec, done, read_bench(args.bench) if args.bench else None, args.deadline_h)
    print(f"job {args.job}: valid. model={spec.model.name} pretrained={spec.model.pretrained}")
    print(f"shards: {len(shards)} ({done} already done), output: {spec.output}, executor: {spec.compute.executor}")
    for line in format_plan(plan):
        print(line)
    if is_url(str(spec.names)):  # the resume hash covers the pool's content, which a dry run does not read
        print("map hash: not computed (the name pool is on object storage); resume check: skipped")
        return EXIT_OK
    from clipaudit.app.resolve import fingerprint_hash, map_fingerprint

    fingerprint = map_fingerprint(spec, wait=False)  # a dry run starts no GPU node
    print(f"map hash: {fingerprint_hash(fingerprint)}")
    if layout is None:
        print("resume check: not done (the output is on object storage; `clipaudit run` checks it first)")
        return EXIT_OK
    conflict = None if args.force else resume_conflict(layout, fingerprint)
    if conflict is not None:
        raise UserError(f"a run would be refused: {conflict}")
    return EXIT_OK


# -- reduce -----------------------------------------------------------------------

def _example_query(enabled: list[str]) -> str:
    """A first query over ``identities``: ranked by the first identity-level score enabled."""
    from clipaudit.contract.registry import scores

    ranked = scores(enabled, "identity")
    order = f" ORDER BY {ranked[0].metric} DESC" if ranked else ""
    return f"SELECT * FROM identities{order} LIMIT 10"


def _example_setting() -> str:
    """``ATTACK.KEY=VALUE`` for the first reduce-only parameter of any registered attack."""
    from clipaudit.contract.registry import registered

    for a in registered():
        for key in sorted(a.reduce_only):
            default = a.params.model_fields[key].default
            return f"{a.name}.{key}={default}"
    return "ATTACK.KEY=VALUE"


def _tau_setting(opts, tau: int) -> str:
    """``--tau N`` as the ``--set`` it stands for: the enabled attack with a reduce-only ``tau``."""
    from clipaudit.contract.registry import get

    owners = [name for name in opts.enabled if "tau" in get(name).reduce_only]
    if len(owners) != 1:
        raise UserError(f"--tau: {'no' if not owners else 'more than one'} enabled attack has a reduce-only tau "
                        f"({', '.join(owners) or 'enabled: ' + ', '.join(opts.enabled)}); use --set ATTACK.tau=N")
    return f"{owners[0]}.tau={tau}"


#: reduce flags that override a job spec setting: argparse dest → (flag, the spec model and key that
#: validate it, the ReduceOptions field it sets)
_SPEC_FLAGS = {"target_fpr": ("--target-fpr", CalibrationSpec, "target_fpr", "target_fpr"),
               "fdr": ("--fdr", CalibrationSpec, "fdr", "fdr"),
               "memory_limit": ("--memory-limit", ComputeSpec, "reduce_memory", "memory_limit")}


def _spec_checked(args: argparse.Namespace) -> dict[str, object]:
    """The reduce overrides given on the command line, as ReduceOptions fields, each validated by
    the job spec's own model (a flag accepts exactly what the job file's key accepts); a bad value
    is a UserError naming the flag."""
    from pydantic import ValidationError

    out = {}
    for dest, (flag, model, key, field) in _SPEC_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        try:
            model.model_validate({key: value})
        except ValidationError as e:
            raise UserError(f"{flag} {value}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        out[field] = value
    return out


def _reduce_overrides(opts, settings: list[str]):
    """Apply ``ATTACK.KEY=VALUE`` settings to reduce-only attack parameters, validated by the
    attack's own spec model (so the reduce step accepts exactly what a job spec accepts)."""
    from dataclasses import replace

    import yaml
    from pydantic import ValidationError

    from clipaudit.contract.registry import get

    params = dict(opts.attacks)
    for setting in settings:
        target, sep, value = setting.partition("=")
        name, dot, key = target.partition(".")
        if not (sep and dot and name and key):
            raise UserError(f"--set {setting!r}: expected ATTACK.KEY=VALUE, e.g. {_example_setting()}")
        if name not in params:
            raise UserError(f"--set {setting!r}: attack {name!r} is not enabled in this audit "
                            f"(enabled: {', '.join(params) or 'none'})")
        attack = get(name)
        if key not in attack.params.model_fields:
            raise UserError(f"--set {setting!r}: {name} has no parameter {key!r} "
                            f"(parameters: {', '.join(attack.params.model_fields)})")
        if key not in attack.reduce_only:
            allowed = ", ".join(sorted(attack.reduce_only)) or "none"
            raise UserError(f"--set {setting!r}: {name}.{key} changes the map step (rerun with `clipaudit run`); "
                            f"reduce-only parameters of {name}: {allowed}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {setting!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        try:
            params[name] = attack.params.model_validate({**params[name].model_dump(), key: parsed})
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
            raise UserError(f"--set {setting!r}: attacks.{name}.{msg}") from None
    return replace(opts, attacks=params)


def cmd_reduce(args: argparse.Namespace) -> int:
    layout = _open_output(args.output_dir, args.storage_options)
    layout.store.warn_single_writer()
    with layout.lock():
        return _reduce_locked(args, layout)


def _reduce_locked(args: argparse.Namespace, layout) -> int:
    from dataclasses import replace

    from clipaudit.app.runner import reduce_mapped, reduce_options, saved_spec

    opts = reduce_options(saved_spec(layout))
    settings = list(args.set or [])
    if args.tau is not None:
        settings.insert(0, _tau_setting(opts, args.tau))
    opts = _reduce_overrides(opts, settings)
    if args.labels is not None and args.no_labels:
        raise UserError("--labels and --no-labels contradict each other")
    if args.no_labels:
        opts = replace(opts, labels=None)
    for key, what in (("labels", "labels"), ("controls", "controls"), ("reference", "--reference")):
        value = getattr(args, key)
        if value is not None:
            if not Path(value).is_file():
                raise UserError(f"{what}: file not found: {value}")
            opts = replace(opts, **{key: Path(value)})
    if args.near_duplicates:
        opts = replace(opts, near_duplicates=True)
    if args.attackers is not None:
        if not (Path(args.attackers) / "attackers").is_dir():
            raise UserError(f"--attackers {args.attackers}: no attackers/ folder there (an audit with labels "
                            "fits and saves its attackers)")
        opts = replace(opts, attackers=Path(args.attackers))
    opts = replace(opts, **_spec_checked(args))
    result = reduce_mapped(layout, opts)
    print("wrote " + ", ".join(layout.store.location(p) for p in result.written))
    from clipaudit.report.text import calibration_lines, metrics_table

    if result.metrics:
        print("\n".join(metrics_table(result.metrics)))
    if result.calibration is not None:
        print("\n".join(calibration_lines(result.calibration)))
    return EXIT_OK


# -- report -----------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from clipaudit.report.text import report_folder

    if args.thumbnails and not args.html:
        raise UserError("--thumbnails goes with --html (the photos are part of the HTML page)")
    # the text is read straight from the output (on object storage: from the store, nothing copied)
    report_folder(args.output_dir, _storage_options(args.output_dir, args.storage_options))
    if not args.html:
        return EXIT_OK
    from clipaudit.report.html import write_html

    layout = _open_output(args.output_dir, args.storage_options)
    page = write_html(layout, args.thumbnails)  # read from and written to the output's store
    print(f"html report: {layout.store.location(page)}")
    return EXIT_OK


# -- ingest -----------------------------------------------------------------------

def cmd_ingest(args: argparse.Namespace) -> int:
    from clipaudit.app.ingest import IngestOptions, ingest, result_lines

    opts = IngestOptions(pool_size=args.pool_size, seed=args.seed, shard_size=args.shard_size,
                         processes=args.processes, threads=args.threads, timeout=args.timeout, retries=args.retries,
                         model=args.model, pretrained=args.pretrained)
    result = ingest(Path(args.urls), Path(args.out), opts)
    print("\n".join(result_lines(result)))
    return EXIT_FAILED_SHARDS if result.unfinished else EXIT_OK


# -- bench ------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from clipaudit.bench.map_step import attack_set, format_bench, run_bench

    log = (lambda msg: None) if args.json and args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr,
                                                                                   flush=True))
    if args.reduce:
        import tempfile

        from clipaudit.bench.reduce_scale import run_reduce_bench

        try:
            sizes = [int(x.replace("_", "")) for x in args.reduce.split(",")]
        except ValueError:
            raise UserError(f"--reduce {args.reduce!r}: row counts joined by commas, e.g. 1000000,10000000") from None
        if min(sizes) < 1000:
            raise UserError("--reduce: each size must be at least 1000 rows")
        with tempfile.TemporaryDirectory(prefix="clipaudit-bench-reduce-") as work:
            result = run_reduce_bench(sizes, Path(work), memory_limit=args.reduce_memory, log=log)
        _bench_output(args, result, "\n".join(f"{k:26s} {v}" for k, v in result.items()))
        return EXIT_OK
    if args.under_load:
        from clipaudit.bench.reduce_load import run_load_bench

        if args.busy < 0:
            raise UserError(f"--busy {args.busy}: a number of processes, 0 or more")
        result = run_load_bench(Path(args.under_load), busy=args.busy, repeat=args.repeat, log=log)
        _bench_output(args, result, "\n".join(f"{k:26s} {v}" for k, v in result.items()))
        return EXIT_OK
    if args.scale:
        from clipaudit.bench.scale import run_scale_bench

        if args.shards < 1 or (args.names is not None and args.names < 1):
            raise UserError("--scale: --shards and --names must be at least 1")
        result = run_scale_bench(names=args.names or 1_000_000, shards=args.shards, workers=args.workers, log=log,
                                 shards_in_flight=args.in_flight)
        _bench_output(args, result, "\n".join(f"{k:26s} {v}" for k, v in result.items()))
        return EXIT_OK if all(result["meets"].values()) else EXIT_FAILED_SHARDS
    if args.quick:
        from clipaudit.bench.quick import run_quick

        result = run_quick(log=log)
        _bench_output(args, result, "\n".join(f"{k:26s} {v}" for k, v in result.items()))
        return EXIT_OK
    try:
        attack_set(args.attacks)
    except ValueError as e:
        raise UserError(str(e)) from None

    result = run_bench(model=args.model, pretrained=args.pretrained, precision=args.precision, device=args.device,
                       n_images=args.images, batch_size=args.batch_size, decode_threads=args.decode_threads,
                       attacks=args.attacks, image_px=args.image_px, n_names=args.names or 100, repeat=args.repeat,
                       log=log)
    _bench_output(args, result, format_bench(result))
    return EXIT_OK


def _bench_output(args: argparse.Namespace, result: dict, text: str) -> None:
    """``--json``: the record alone on stdout; else the table. ``--json-out``: also a file."""
    print(json.dumps(result) if args.json else text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr if args.json else sys.stdout)


# -- query ------------------------------------------------------------------------

def cmd_query(args: argparse.Namespace) -> int:
    from clipaudit.report.query import FORMATTERS, run_query

    # an output URL is read straight from the store: nothing is copied to this machine
    columns, rows = run_query(args.output_dir, args.sql, _storage_options(args.output_dir, args.storage_options))
    text = FORMATTERS[args.format](columns, rows)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


# -- demo -------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from clipaudit.lab.demo import LAB_PRESETS, run_demo

    import dataclasses

    cfg = dataclasses.replace(LAB_PRESETS[args.lab], seed=args.seed)
    return run_demo(Path(args.output), progress=not args.no_progress, cfg=cfg)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("clipaudit")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _storage_options_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", metavar="JSON",
                   help="for an OUTPUT_DIR on object storage: fsspec options as JSON, e.g. "
                        "'{\"endpoint_url\": \"${S3_ENDPOINT}\"}' (${VAR} is read from the environment; default: the "
                        "backend's own environment variables and config). The output is read and written on the "
                        "store; temp files go under $CLIPAUDIT_SCRATCH_DIR (default: the system's temp folder)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipaudit", description="Membership-inference audits of CLIP models.")
    p.add_argument("-V", "--version", action="version", version=f"clipaudit {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) an audit described by a job YAML")
    r.add_argument("job", help="job spec YAML")
    r.add_argument("--output", help="output folder (overrides the spec's `output`)")
    r.add_argument("--force", action="store_true", help="recompute everything, discarding earlier outputs")
    r.add_argument("--dry-run", action="store_true",
                   help="validate the spec, print the plan (shards, images, actors, GPUs, time) and the inputs that "
                        "cannot be checked from here (object storage, hub weights); run nothing")
    r.add_argument("--bench", metavar="BENCH_JSON",
                   help="with --dry-run: a `clipaudit bench --json-out` record of the same model, for a time estimate")
    r.add_argument("--deadline-h", type=float, metavar="HOURS",
                   help="with --dry-run --bench: the actors and GPUs that map every image within HOURS at the benched "
                        "rate (what compute.workers, a RayJob's GPU group and its deadline follow from)")
    r.add_argument("--map-only", action="store_true",
                   help="stop after the map step and its summary; run the reduce step later with `clipaudit reduce "
                        "OUTPUT` (e.g. on a CPU node once the GPU workers are released)")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a `map progress:` line every "
                        "compute.progress_interval_s)")
    r.add_argument("--quiet", action="store_true", help="print only the final summary, warnings and errors")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("reduce", help="recompute identities.parquet and metrics.json (no model)")
    d.add_argument("output_dir", metavar="OUTPUT_DIR", help="an audit's output folder (holds _job.json), or its URL "
                                                            "on object storage (s3://…)")
    _storage_options_arg(d)
    d.add_argument("--tau", type=int, help="the identity-level vote's threshold (default: the job's); short for "
                                           "--set ATTACK.tau=N for the enabled attack with a reduce-only tau")
    d.add_argument("--set", action="append", metavar="ATTACK.KEY=VALUE",
                   help="change a reduce-only attack parameter (repeatable; default: the job's)")
    d.add_argument("--labels", help="labels CSV (default: the job's)")
    d.add_argument("--near-duplicates", action="store_true",
                   help="find re-uploads and resized copies among each identity's images (embedding cosine >= 0.95 and "
                        "image hashes within 6 of 64 bits) and list them in near_duplicates.parquet; copies do not "
                        "count as independent images of their identity (off by default)")
    d.add_argument("--reference", metavar="INDEX",
                   help="a FAISS index file (e.g. of a public training set's image embeddings, same model): "
                        "every candidate's nearest neighbour and similarity go to reference_matches.parquet")
    d.add_argument("--no-labels", action="store_true",
                   help="ignore the job's labels: no metrics.json; with controls, the learned attackers are fitted "
                        "weakly (controls vs candidates scoring above them)")
    d.add_argument("--controls", help="CSV of known non-members (identity and/or shard,key rows) for "
                                      "p-values and thresholds (default: the job's calibration.controls)")
    d.add_argument("--attackers", metavar="OTHER_OUTPUT_DIR",
                   help="score every sample with the learned attackers fitted on another audit (its attackers/), "
                        "e.g. of a shadow model or a labelled calibration set, instead of fitting them here")
    d.add_argument("--target-fpr", type=float, help="flag scores whose control p-value is at most this "
                                                     "(default: the job's calibration.target_fpr, 0.01)")
    d.add_argument("--fdr", type=float, help="false-discovery rate of the discoveries (Benjamini-Hochberg q-value "
                                              "<= FDR; default: the job's calibration.fdr, 0.1)")
    d.add_argument("--memory-limit", metavar="SIZE",
                   help="DuckDB's memory limit, e.g. 4GB (default: the job's compute.reduce_memory, "
                        f"{REDUCE_MEMORY}); beyond it "
                        "DuckDB spills to OUTPUT_DIR/_tmp")
    d.set_defaults(func=cmd_reduce)

    m = sub.add_parser("demo", help="self-contained synthetic audit (canary lab), a few minutes on a CPU")
    m.add_argument("--output", default="clipaudit-demo",
                   help="folder for the lab and results (default ./clipaudit-demo)")
    m.add_argument("--lab", choices=["default", "overfit", "shifted", "caption-shift"], default="default",
                   help="canary preset: default; overfit (1 photo per member, augmented training: image-level "
                        "attacks get signal); shifted (non-members from another camera style: validity warning); "
                        "caption-shift (non-members' captions from another source: the text baseline's warning)")
    m.add_argument("--seed", type=int, default=0, help="lab seed (identities, photos, training); default 0")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_demo)

    rp = sub.add_parser("report", help="print what an output folder holds: summary, metrics, calibration")
    rp.add_argument("output_dir", metavar="OUTPUT_DIR", help="an audit's output folder, or its URL on object "
                                                             "storage (s3://…)")
    _storage_options_arg(rp)
    rp.add_argument("--html", action="store_true",
                    help="also write OUTPUT_DIR/report.html (one self-contained page with plots; the PNGs under "
                         "OUTPUT_DIR/report/); needs the `report` extra (matplotlib)")
    rp.add_argument("--thumbnails", action="store_true",
                    help="with --html: small photos of the top identities, read back from the shards (personal "
                         "data: off by default)")
    rp.set_defaults(func=cmd_report)

    i = sub.add_parser("ingest", help="url,identity[,caption] list → WebDataset shards (img2dataset), names.txt and "
                                      "a starter job.yaml in OUT; needs the `ingest` extra")
    i.add_argument("urls", metavar="URLS", help="the URL list: .parquet, .csv, .tsv or .jsonl with columns url, "
                                                "identity and optionally caption")
    i.add_argument("out", metavar="OUT", help="a new or empty folder for the shards (re-running with the same list "
                                              "resumes)")
    i.add_argument("--pool-size", type=int, default=1000,
                   help="names in names.txt: every identity plus generated distractors (default 1000, the pool size of "
                        "the identity-inference paper)")
    i.add_argument("--seed", type=int, default=0, help="seed of the distractor names (default 0)")
    i.add_argument("--shard-size", type=int, default=10_000, help="URLs per shard (default 10000)")
    i.add_argument("--processes", type=int, default=1, help="img2dataset download processes (default 1)")
    i.add_argument("--threads", type=int, default=16, help="download threads per process (default 16)")
    i.add_argument("--timeout", type=int, default=10, help="seconds per download (default 10)")
    i.add_argument("--retries", type=int, default=0, help="retries of a failed download (default 0)")
    i.add_argument("--model", default=None, help="model.name written to a new job.yaml (default: a placeholder, "
                                                  "ViT-B-32)")
    i.add_argument("--pretrained", default=None,
                   help="model.pretrained written to a new job.yaml (default: a placeholder, laion2b_s34b_b79k)")
    i.set_defaults(func=cmd_ingest)

    b = sub.add_parser("bench", help="map-step throughput beside a model-only baseline, same run (synthetic shards)")
    b.add_argument("--model", default="ViT-B-32", help="OpenCLIP name or model-config JSON (default ViT-B-32)")
    b.add_argument("--pretrained", default=None, help="weights (default: random init — same speed, no download)")
    b.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: fp16 on GPU, fp32 on CPU")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: cuda when present)")
    b.add_argument("--images", type=int, default=512, help="synthetic images per pass (default 512)")
    b.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    b.add_argument("--decode-threads", type=int, default=2, help="JPEG decode threads of the map step (default 2)")
    b.add_argument("--image-px", type=int, default=256, help="side of the synthetic JPEGs (default 256)")
    b.add_argument("--names", type=int, default=None,
                   help="name-pool size (its encoding is start-up, timed apart; default 100; with --scale 1,000,000)")
    b.add_argument("--attacks", default="default",
                   help="all, default, or registered attack names joined by + (default: default = the attacks a job "
                        "runs by default)")
    b.add_argument("--repeat", type=int, default=3, help="passes per stage; rates are medians (default 3)")
    b.add_argument("--quick", action="store_true",
                   help="every speed figure (model-only, end to end, naive loop, augmentation, name index and its "
                        "recall, memory, 1 vs 2 processes) on a small 96-px model, ~3 min on a 2-core CPU")
    b.add_argument("--scale", action="store_true",
                   help="instead: a CPU rehearsal at LAION sizes except the model — a local S3 server, a local Ray, "
                        "--names names × 21 templates, --shards shards through a tiny model; memory, driver time per "
                        "shard and bytes against their targets (exit 1 when one is missed; ~10 min on 2 cores)")
    b.add_argument("--shards", type=int, default=2000, help="with --scale: shards of 2 images (default 2000)")
    b.add_argument("--workers", type=int, default=2, help="with --scale: map actors (default 2)")
    b.add_argument("--in-flight", type=int, default=None, metavar="N",
                   help="with --scale: compute.shards_in_flight per actor (default: the spec's for a CPU, 1)")
    b.add_argument("--reduce", metavar="ROWS,ROWS",
                   help="instead: the reduce step's peak memory and time on synthetic output folders of these sizes "
                        "(rows, e.g. 1000000,10000000; written to a temp folder, ~280 MB per million rows)")
    b.add_argument("--reduce-memory", default=REDUCE_MEMORY, metavar="SIZE",
                   help=f"with --reduce: DuckDB's memory limit (compute.reduce_memory; default {REDUCE_MEMORY})")
    b.add_argument("--under-load", metavar="OUT",
                   help="instead: `clipaudit reduce` of the audit OUT (copied; OUT is not changed) alone and beside "
                        "--busy busy-loop processes, --repeat times each; medians and their ratio")
    b.add_argument("--busy", type=int, default=2, help="with --under-load: busy-loop processes (default 2)")
    b.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout, nothing else")
    b.add_argument("--json-out", metavar="PATH", help="also write the result record to PATH")
    b.add_argument("--quiet", action="store_true", help="with --json: no progress lines on stderr")
    b.set_defaults(func=cmd_bench)

    q = sub.add_parser("query", help="SQL (DuckDB) over the outputs: views samples, identities, embeddings, "
                                          "sample_scores, downloads")
    q.add_argument("output_dir", metavar="OUTPUT_DIR", help="an audit's output folder, or its URL on object "
                                                            "storage (s3://…; read from the store directly)")
    _storage_options_arg(q)
    q.add_argument("sql", metavar="SQL", help="one read-only statement (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE), "
                                              "e.g. \"SELECT * FROM identities LIMIT 10\"")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table (default; at most 100 rows shown), csv or json (all rows)")
    q.set_defaults(func=cmd_query)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, quiet=getattr(args, "quiet", False) and args.func is cmd_run)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader of stdout went away (e.g. `| head -3`): what it read was all it wanted
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted: completed shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        inner = _unwrap(e)
        if isinstance(inner, (ClipauditError, FileNotFoundError)):
            print(f"error: {inner}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
