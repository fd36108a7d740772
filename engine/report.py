"""Human-readable summaries of a run and of its metrics (terminal output)."""

from __future__ import annotations

import sys


def _cell(m: dict, k: str) -> str:
    v, ci = m.get(k), m.get(f"{k}_ci")
    return "-" if v is None else f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def metrics_table(metrics: dict) -> list[str]:
    """One line per attack (and its learned variant) plus the model-free baseline."""
    lines = [f"{'attack':22s} {'level':9s} {'AUC':20s} {'TPR@1%FPR':20s} {'TPR@0.1%FPR':20s}"]
    def line(name: str, m: dict) -> str:
        return (f"{name:22s} {m.get('level', '-'):9s} {_cell(m, 'auc'):20s} {_cell(m, 'tpr_at_1pct_fpr'):20s} "
                f"{_cell(m, 'tpr_at_0_1pct_fpr'):20s}")
    for name in ("idia", "encodermi", "partcrop", "mim", "caption", "caption_calibrated"):
        m = metrics.get(name)
        if isinstance(m, dict) and "auc" in m:
            lines.append(line(name, m))
            for variant, label in (("learned", "learned"), ("learned_set", "set")):
                if variant in m:
                    lines.append(line(f"  {name} ({label})", m[variant]))
    b = metrics.get("baseline")
    for bm in (b.get("by_level", [b]) if isinstance(b, dict) else []):
        lines.append(line("baseline (model-free)", bm))
    if metrics.get("distribution_shift_warning"):
        lines.append("WARNING: the model-free baseline separates members from non-members about as well as "
                     "an attack: the sets likely differ in source (distribution shift), not only in membership.")
    return lines


def print_report(report, out=sys.stdout) -> None:
    s = report.summary
    errs = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
    print(f"shards: {s['shards_done']}/{s['shards']} done ({report.skipped} skipped as already done), "
          f"{s['shards_failed']} failed", file=out)
    print(f"samples: {s['rows']} rows, {s['ok']} ok, errors: {errs}", file=out)
    if s.get("warnings"):
        warns = ", ".join(f"{k}={v}" for k, v in s["warnings"].items())
        print(f"warnings (rows still scored): {warns}", file=out)
    dup = s.get("duplicate_keys_across_shards") or {}
    if dup.get("keys"):
        print(f"note: {dup['keys']} key(s) occur in more than one shard ({dup['rows']} rows); each row is kept "
              "and identified by shard + key", file=out)
    for f in s["failed"]:
        print(f"FAILED shard {f['shard']} after {f['attempts']} attempts: {f['error']}", file=out)
    if report.map.done:
        rows = sum(d["rows"] for d in report.map.done)
        print(f"map: {rows} samples in {report.map.seconds:.1f} s ({rows / max(report.map.seconds, 1e-9):.1f} img/s)",
              file=out)
    if report.metrics:
        print("\n".join(metrics_table(report.metrics)), file=out)
    print(f"output: {report.layout.root}", file=out)
