"""Human-readable summaries of a run and of its metrics (terminal output)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clipaudit.contract.registry import registered
from clipaudit.reduce.conformal import controls_in_words
from clipaudit.app.audit import NAMES, Audit


def _cell(m: dict, k: str) -> str:
    v, ci, note = m.get(k), m.get(f"{k}_ci"), m.get(f"{k}_note")
    if v is None:
        if not note:
            return "-"
        short = note.split(" (")[0]  # the table keeps the count; metrics.json keeps the reason
        return f"n/a ({short.replace(' at this level', '').replace('>=', '≥')})"
    return f"{v:.3f}" if ci is None else f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


#: short names of levels in the table (the column is 9 characters wide)
LEVEL_LABELS = {"image_within_identity": "within-id"}


def _at_k(m: dict) -> str:
    """" (k=5)", or " (k=5, 3 short)" when identities below k are left out of the headline."""
    if not m.get("k"):
        return ""
    return f" (k={m['k']}, {m['n_short']} short)" if m.get("n_short") else f" (k={m['k']})"


def score_entries(metrics: dict) -> Iterator[tuple[str, str | None, dict]]:
    """(score, learned variant's label or None, entry) for every attack score with metrics, in
    registry order: at the score's level, then within identities, each followed by its learned
    variants."""
    for attack in registered():
        for score in attack.scores:
            m = metrics.get(score.name)
            if not isinstance(m, dict) or "auc" not in m:
                continue
            for entry in (m, m.get("within_identity")):  # the score's level, then within identities
                if not isinstance(entry, dict) or "auc" not in entry:
                    continue
                yield score.name, None, entry
                for learner in attack.learned:
                    if isinstance(entry.get(learner.name), dict):
                        yield score.name, learner.label, entry[learner.name]


def metrics_rows(metrics: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(name, level, AUC, blind AUC, TPR@1%FPR, TPR@0.1%FPR) cells per attack score, its learned
    variants (names indented) and the model-free baseline per level."""
    def row(name: str, m: dict) -> tuple[str, str, str, str, str, str]:
        base = f"{m['baseline_auc']:.3f}" if m.get("baseline_auc") is not None else ""
        return (name, LEVEL_LABELS.get(m.get("level", "-"), m.get("level", "-")), _cell(m, "auc"), base,
                _cell(m, "tpr_at_1pct_fpr"), _cell(m, "tpr_at_0_1pct_fpr"))

    rows = [row(score + _at_k(entry) if label is None else f"  {score} ({label})", entry)
            for score, label, entry in score_entries(metrics)]
    b = metrics.get("baseline")
    for bm in (b.get("by_level", {}) if isinstance(b, dict) else {}).values():
        rows.append(row("blind baseline", bm))
    return rows


def shift_warnings(metrics: dict) -> list[str]:
    """The distribution-shift warning, one sentence per level where the blind baseline raised it."""
    b = metrics.get("baseline")
    out = []
    for level, bm in (b.get("by_level", {}) if isinstance(b, dict) else {}).items():
        if bm.get("warning"):
            out.append(f"WARNING ({level} level): the blind baseline, which never sees the model, tells the labelled "
                       f"members from the non-members (AUC {_baseline_auc(bm)}): the two sets "
                       "differ in their images or captions, so attack scores at this level may measure that "
                       "difference (distribution shift), not membership.")
    return out


def _baseline_auc(bm: dict) -> str:
    """The baseline's AUC with its interval and, where measured, where it lies with inputs
    unrelated to the labels (mean and spread over refits)."""
    lo, hi = bm["auc_ci"]
    text = f"{bm['auc']:.3f} [{lo:.2f}, {hi:.2f}]"
    null = bm.get("null")
    if null and null.get("auc_sd") is not None:
        text += (f"; {null['auc_mean']:.3f} ± {null['auc_sd']:.3f} with inputs unrelated to the labels "
                 f"({null['refits']} refits)")
    return text


def shift_checks(metrics: dict) -> list[str]:
    """Per level without a warning, that no shift was detected, with the baseline's interval
    (what it does not rule out); and per level, the attacks whose AUC exceeds the baseline's on
    the same units (paired bootstrap interval above 0)."""
    b = metrics.get("baseline")
    out = []
    for level, bm in (b.get("by_level", {}) if isinstance(b, dict) else {}).items():
        where = LEVEL_LABELS.get(level, level)
        if not bm.get("warning") and bm.get("auc_ci"):
            out.append(f"shift not detected ({where} level): blind baseline AUC {_baseline_auc(bm)} — the warning "
                       "needs the lower end above 0.55; a shift up to the upper end is not ruled out")
        beyond, total = [], 0
        for score, label, entry in score_entries(metrics):
            v = entry.get("vs_baseline") or {}
            if entry.get("level") != level or not v.get("auc_difference_ci"):
                continue
            total += 1
            lo, hi = v["auc_difference_ci"]
            if lo > 0:
                name = score if label is None else f"{score} ({label})"
                beyond.append(f"{name} {v['auc_difference']:+.3f} [{lo:+.2f}, {hi:+.2f}]")
        if total:
            out.append(f"beyond the blind baseline ({where} level, AUC difference, paired): "
                       + ("; ".join(beyond) if beyond else "none") + f" ({len(beyond)} of {total})")
    return out


METRICS_HEADER = ("attack", "level", "AUC", "blind AUC", "TPR@1%FPR", "TPR@0.1%FPR")


def metrics_table(metrics: dict) -> list[str]:
    """One line per attack (and its learned variant) plus the model-free baseline."""
    widths = (22, 9, 20, 9, 38)
    lines = [" ".join(c.ljust(w) for c, w in zip(r, widths)) + " " + r[-1]
             for r in [METRICS_HEADER, *metrics_rows(metrics)]]
    return [line.rstrip() for line in lines] + sample_lines(metrics) + shift_warnings(metrics) + shift_checks(metrics)


def sample_lines(metrics: dict) -> list[str]:
    """One line per score whose attack scored a sample (``attacks.<name>.sample``), and one per
    level whose evaluation the caps cut (``evaluation_sample``)."""
    out = []
    for name, entry in metrics.items():
        sample = entry.get("sample") if isinstance(entry, dict) else None
        if isinstance(sample, dict):
            out.append(f"{name}: scored {sample['scored_images']} of {sample['ok_images']} ok images — "
                       f"{sample['note']}")
    ev = metrics.get("evaluation_sample") or {}
    for level, got in ev.get("levels", {}).items():  # only where the caps left units out
        if got.get("of") is not None and got["units"] < got["of"]:
            out.append(f"evaluation sample ({level} level): {got['units']:,} of {got['of']:,} labelled units from "
                       f"{got['identities']:,} of {got['of_identities']:,} identities (at most {ev['per_identity']} "
                       f"images per identity, {ev['max_units']:,} units per level, seeded)")
    return out


def summary_lines(s: dict) -> list[str]:
    """The job summary (``_SUMMARY.json``) in words."""
    if not s.get("shards_done"):
        lines = ["samples: none — no shard was mapped, so there is no identities.parquet and no metrics"
                 + (" (see the FAILED shards below)" if s.get("failed") else "")]
    else:
        errs = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
        lines = [f"samples: {s['rows']} rows, {s['ok']} ok, errors: {errs}"]
    if s.get("warnings"):
        warns = ", ".join(f"{k}={v}" for k, v in s["warnings"].items())
        lines.append(f"warnings (rows still scored): {warns}")
    dup = s.get("duplicate_keys_across_shards") or {}
    if dup.get("keys"):
        lines.append(f"note: {dup['keys']} key(s) occur in more than one shard ({dup['rows']} rows); each row is kept "
                     "and identified by shard + key")
    dl = s.get("downloads")
    if dl:
        items = list(dl["missing_by_reason"].items())
        reasons = ", ".join(f"{k}={v}" for k, v in items[:5]) + (f", … {len(items) - 5} more" if len(items) > 5 else "")
        why = f" (img2dataset: {reasons})" if items else ""
        lines.append(f"downloads: {dl['missing']} of {dl['urls']} URLs missing from the shards{why}; "
                     "their rows: the downloads view")
    lines += [f"FAILED shard {f['shard']} after {f['attempts']} attempts: {f['error']}" for f in s["failed"]]
    return lines


def calibration_lines(cal: dict) -> list[str]:
    """``calibration.json`` in words: per level and score, controls, threshold, flagged."""
    lines = [f"calibration at target FPR {cal['target_fpr']} from {controls_in_words(cal['controls'])} "
             f"({', '.join(cal['controls']['sources'])})"]
    notes: dict[str, list[str]] = {}  # a note shared by several scores is printed once
    for level in ("identity", "image"):
        for attack, e in cal.get(level, {}).items():
            found = (f"  discoveries {e['discoveries']} (≈ {e['expected_false_discoveries']:g} false at FDR "
                     f"{e['fdr']:g})") if "discoveries" in e else ""
            if "threshold" in e:
                t = "none (too few controls)" if e["threshold"] is None else f"{e['threshold']:.4g}"
                lines.append(f"  {level:8s} {attack:20s} {e['n_controls']:6d} controls  threshold {t:>10s}  "
                             f"flagged {e['flagged']}/{e['n_scored']}{found}")
            elif "comparison" in e:  # count-matched: no single threshold
                lines.append(f"  {level:8s} {attack:20s} {e['n_controls']:6d} controls  matched by image count  "
                             f"flagged {e['flagged']}/{e['n_scored']}{found}")
            elif found:  # the combination of the attacks (identity level)
                lines.append(f"  {level:8s} {attack:20s} {e.get('what', '')}:{found}")
            if "note" in e:
                notes.setdefault(e["note"], []).append(f"{level} {attack}")
    for note, where in notes.items():
        lines.append(f"  note ({', '.join(where)}): {note}")
    return lines


def print_report(report, out=None) -> None:
    out = out or sys.stdout
    s = report.summary
    print(f"shards: {s['shards_done']}/{s['shards']} done ({report.skipped} skipped as already done), "
          f"{s['shards_failed']} failed", file=out)
    print("\n".join(summary_lines(s)), file=out)
    if report.map.done:
        rows = sum(d["rows"] for d in report.map.done)
        print(f"map: {rows} samples in {report.map.seconds:.1f} s ({rows / max(report.map.seconds, 1e-9):.1f} img/s)",
              file=out)
    if not report.reduced and not report.map_only:
        print("nothing to do: every shard was done and nothing the reduce step reads had changed, so no file was "
              "rewritten (`clipaudit reduce` recomputes identities and metrics)", file=out)
    if report.metrics:
        print("\n".join(metrics_table(report.metrics)), file=out)
    print(f"output: {report.layout.root}", file=out)


def report_folder(output: str | Path, storage_options: Mapping[str, Any] | None = None, out=None) -> None:
    """``clipaudit report OUT``: what an output folder holds, without recomputing anything; an
    output URL is read straight from the store (its JSON files; nothing is copied here)."""
    out = out or sys.stdout
    audit = Audit.open(output, storage_options)
    summary = audit.require_json(NAMES.summary)
    if audit.exists(NAMES.job_state):  # imports the job's attack plugins, so their lines are printed too
        audit.saved_spec()
    m = audit.read_json(NAMES.manifest)
    if m is not None:
        sha = (m["model"].get("checkpoint_sha256") or "-")[:16]
        print(f"model: {m['model']['name']} ({m['model'].get('pretrained') or 'no weights'}, sha256 {sha}…), "
              f"run {m.get('started')} → {m.get('ended')}, map hash {m.get('map_hash')}", file=out)
    print(f"shards: {summary['shards_done']}/{summary['shards']} done, {summary['shards_failed']} failed", file=out)
    print("\n".join(summary_lines(summary)), file=out)
    metrics = audit.read_json(NAMES.metrics)
    if metrics is not None:
        print("\n".join(metrics_table(metrics)), file=out)
    elif audit.exists(NAMES.identities):
        print("no metrics.json (no labels): see identities.parquet", file=out)
    calibration = audit.read_json(NAMES.calibration)
    if calibration is not None:
        print("\n".join(calibration_lines(calibration)), file=out)
