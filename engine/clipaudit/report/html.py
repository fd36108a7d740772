"""``clipaudit report OUT --html``: one self-contained page, ``OUT/report.html``.

The plots are drawn with matplotlib (Agg, the ``report`` extra), written as PNGs under
``OUT/report/`` and embedded in the page as data URIs; the page loads nothing and runs no
script. Everything comes from the output folder as the audit left it; attacks, their scores
and learned variants come from the registry, sweeps from whatever ``metrics.json`` entry
carries a ``sweep`` list. Every piece of text put into the page is escaped.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import pyarrow as pa

from clipaudit.core.errors import ClipauditError
from clipaudit.contract.registry import Attack, registered
from clipaudit.io.outputs import OutputLayout
from clipaudit.report.text import (
    METRICS_HEADER, calibration_lines, metrics_rows, shift_checks, shift_warnings, summary_lines
)
from clipaudit.io.outputs import no_audit
from clipaudit.io.tables import duckdb_views
from clipaudit.data.urls import is_url
from clipaudit.data.labels import LabelsError, ShardMatcher, read_labels
from clipaudit.data.tar_reader import IMAGE_EXTS, iter_tar_samples
from clipaudit.app.runner import saved_spec

log = logging.getLogger(__name__)

TOP_IDENTITIES = 20
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


class MissingExtra(ClipauditError, RuntimeError):
    """An optional dependency the HTML report needs is not installed."""


@dataclass
class Plot:
    """One figure: its file stem under ``OUT/report/``, alt text, caption and PNG bytes."""

    stem: str
    alt: str
    caption: str
    png: bytes


def _figure(width: float = 6.4, height: float = 4.2):
    """A matplotlib figure on the Agg canvas (no pyplot, no global backend state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra("clipaudit report --html draws its plots with matplotlib, which is not installed: "
                           "pip install 'clipaudit[report]'") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


# -- data --------------------------------------------------------------------------

def _connect(layout: OutputLayout):
    return duckdb_views(layout)


def _views(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}


def _columns(con, view: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]


def _saved_spec_json(layout: OutputLayout) -> dict[str, Any]:
    """The job's spec as ``_job.json`` holds it, or {} where there is none to read."""
    try:
        return (layout.read_json(layout.job_state) or {})["spec"]
    except (OSError, KeyError, TypeError):
        return {}


def _storage_options(spec: dict[str, Any]) -> dict[str, Any]:
    """A saved spec's ``data.storage_options`` (``${VAR}`` references are resolved when a URL is opened)."""
    return dict((spec.get("data") or {}).get("storage_options") or {})


def _image_labels(layout: OutputLayout, con) -> dict[tuple[str, str], bool]:
    """Image rows of the job's labels file, keyed by the audited shard and key; empty when the
    file is gone or has none (the output folder stores no per-image label)."""
    spec = _saved_spec_json(layout)
    path = spec.get("labels")
    if not path or not (is_url(path) or Path(path).is_file()):
        return {}
    shards = [r[0] for r in con.execute("SELECT DISTINCT shard FROM samples").fetchall()]
    try:  # a URL is read with the job's storage options (saved with ${VAR} references, resolved here)
        labels = read_labels(path if is_url(path) else Path(path), _storage_options(spec))
        return labels.matched(ShardMatcher(shards)).images
    except (LabelsError, OSError) as e:  # gone, unreachable or no longer readable: identity labels only
        log.warning("report: the image labels of %s cannot be read (%s); the histograms label each image as its "
                    "identity", path, e)
        return {}


# -- plots -------------------------------------------------------------------------

def _curve_label(attack: Attack, score: str, variant: str, metrics: dict) -> str:
    m = metrics.get(score) if isinstance(metrics.get(score), dict) else {}
    labels = {learner.name: learner.label for learner in attack.learned}
    entry = m if variant == "threshold" else m.get(variant, {})
    name = score if variant == "threshold" else f"{score} ({labels.get(variant, variant)})"
    auc = entry.get("auc") if isinstance(entry, dict) else None
    return f"{name}, AUC {auc:.3f}" if auc is not None else name


def roc_plots(layout: OutputLayout, metrics: dict) -> list[Plot]:
    """One log-log ROC per attack: each score's threshold and learned variants, the blind
    baseline at the same level (dashed) and the chance line."""
    import pyarrow.parquet as pq

    try:
        with layout.store.open(layout.roc) as f:
            rows = pq.read_table(f).to_pylist()
    except FileNotFoundError:
        return []
    curves: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault((r["attack"], r["level"], r["variant"]), []).append((r["fpr"], r["tpr"]))
    plots = []
    for attack in registered():
        mine = [(s.name, level, variant) for s in attack.scores for (a, level, variant) in curves if a == s.name]
        if not mine:
            continue
        mine.sort(key=lambda c: (c[0], c[2] != "threshold", c[2]))
        levels = sorted({level for _, level, _ in mine})
        # the lowest rate drawn: half a non-member of the largest set (0 has no place on a log axis)
        n_non = max((metrics[s].get("n_nonmembers") or 0 for s, _, _ in mine if isinstance(metrics.get(s), dict)),
                    default=0)
        floor = min(0.5 / n_non, 1e-2) if n_non else 1e-3
        fig = _figure()
        ax = fig.add_subplot()
        labels = []
        for i, (score, level, variant) in enumerate(mine):
            pts = curves[(score, level, variant)]
            label = _curve_label(attack, score, variant, metrics)
            labels.append(label)
            ax.plot([max(f, floor) for f, _ in pts], [max(t, floor) for _, t in pts],
                    color=_COLOURS[i % len(_COLOURS)], lw=2 if variant == "threshold" else 1.2,
                    label=label)
        base = metrics.get("baseline", {}).get("by_level", {}) if isinstance(metrics.get("baseline"), dict) else {}
        for level in levels:
            for (a, lv, _variant), pts in curves.items():
                if a == "baseline" and lv == level:
                    auc = base.get(level, {}).get("auc")
                    label = f"blind baseline ({level})" + (f", AUC {auc:.3f}" if auc is not None else "")
                    labels.append(label)
                    ax.plot([max(f, floor) for f, _ in pts], [max(t, floor) for _, t in pts], color="grey",
                            ls="--", lw=1.2, label=label)
        ax.plot([floor, 1], [floor, 1], color="black", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1.05)
        ax.set_ylim(floor, 1.05)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"{attack.title}: ROC ({', '.join(levels)} level)", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="lower right")
        plots.append(Plot(f"roc-{attack.name}", f"ROC of {attack.name} ({attack.title})",
                          f"ROC of {attack.name}, log-log; rates below {floor:.2g} are drawn at {floor:.2g}. "
                          f"Curves: {'; '.join(labels)}; chance.", _png(fig)))
    return plots


def _groups(con, score, level: str, image_labels: dict[tuple[str, str], bool]) -> tuple[dict[str, list[float]], str]:
    """Score values by group (members, non-members, controls, unlabelled) and a note on where
    the groups came from; empty when the folder lacks the score."""
    views = _views(con)
    has_scores = "sample_scores" in views
    if level == "identity":
        if "identities" not in views or score.metric not in _columns(con, "identities"):
            return {}, ""
        ctrl = ("LEFT JOIN (SELECT identity, bool_and(is_control) AS control FROM sample_scores GROUP BY identity) c "
                "USING (identity)") if has_scores else ""
        rows = con.execute(f"""SELECT i."{score.metric}", i.label_member, {'c.control' if has_scores else 'NULL'}
                               FROM identities i {ctrl}""").fetchall()
        note = "per identity"
    else:
        col = f"{score.name}_score"
        if col not in _columns(con, "samples"):
            return {}, ""
        lab = "LEFT JOIN identities i USING (identity)" if "identities" in views else ""
        ctrl = "LEFT JOIN sample_scores c USING (shard, key)" if has_scores else ""
        rows = con.execute(f"""SELECT s."{col}", {'i.label_member' if lab else 'NULL'},
                                      {'c.is_control' if has_scores else 'NULL'}, s.shard, s.key
                               FROM samples s {lab} {ctrl}
                               WHERE s.status = 'ok' AND s.identity IS NOT NULL""").fetchall()
        if image_labels:
            rows = [(v, image_labels.get((shard, key)), c) for v, _, c, shard, key in rows]
            note = "per image, image labels of the job's labels file"
        else:
            rows = [(v, m, c) for v, m, c, _, _ in rows]
            note = "per image, each labelled as its identity (no image labels)"
    out: dict[str, list[float]] = {"members": [], "non-members": [], "unlabelled": [], "controls": []}
    for value, member, control in rows:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out["unlabelled" if member is None else "members" if member else "non-members"].append(float(value))
        if control:
            out["controls"].append(float(value))
    return {k: v for k, v in out.items() if v}, note


def histogram_plots(layout: OutputLayout, metrics: dict) -> list[Plot]:
    """Per attack, a histogram of each score for members, non-members, unlabelled candidates and
    the calibration controls, at the level its metrics use."""
    con = _connect(layout)
    try:
        if "samples" not in _views(con):
            return []
        image_labels = _image_labels(layout, con)
        plots = []
        for attack in registered():
            panels = []
            for score in attack.scores:
                m = metrics.get(score.name)
                level = m.get("level", score.level) if isinstance(m, dict) else score.level
                groups, note = _groups(con, score, level, image_labels)
                if groups:
                    panels.append((score, level, groups, note))
            if not panels:
                continue
            fig = _figure(6.4, 3.2 * len(panels))
            captions = []
            for ax, (score, level, groups, note) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
                values = [v for vs in groups.values() for v in vs]
                lo, hi = min(values), max(values)
                bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
                style = {"members": ("#d62728", "stepfilled", 0.35), "non-members": ("#1f77b4", "stepfilled", 0.35),
                         "unlabelled": ("#7f7f7f", "stepfilled", 0.25), "controls": ("black", "step", 1.0)}
                for name, vs in groups.items():
                    colour, kind, alpha = style[name]
                    ax.hist(vs, bins=bins, density=True, histtype=kind, color=colour, alpha=alpha,
                            ls="--" if name == "controls" else "-", lw=1.5, label=f"{name} (n={len(vs)})")
                ax.set_xlabel(f"{score.metric if level == 'identity' else score.name + '_score'} ({level} level)")
                ax.set_ylabel("density")
                ax.set_title(f"{attack.title}: {score.name}, {note.split(',')[0]}", fontsize=9)
                ax.legend(fontsize=7)
                captions.append(f"{score.name}: " + ", ".join(f"{k} n={len(v)}" for k, v in groups.items())
                                + f" ({note})")
            plots.append(Plot(f"scores-{attack.name}", f"score histograms of {attack.name}",
                              "Score histograms (densities); controls are the known non-members the calibration "
                              "used and overlap the labelled non-members. " + "; ".join(captions), _png(fig)))
        return plots
    finally:
        con.close()


def _sweeps(metrics: dict) -> list[tuple[str, str, list[dict]]]:
    """(metrics key, title, entries) for every metrics entry carrying a ``sweep`` list, registry order first."""
    titles = {s.name: a.title for a in registered() for s in a.scores}
    keys = [s.name for a in registered() for s in a.scores] + sorted(metrics)
    out, seen = [], set()
    for key in keys:
        m = metrics.get(key)
        if key in seen or not isinstance(m, dict) or not isinstance(m.get("sweep"), list) or not m["sweep"]:
            continue
        seen.add(key)
        out.append((key, titles.get(key, key), m["sweep"]))
    return out


def sweep_plots(metrics: dict) -> list[Plot]:
    """TPR and FPR (mean ± std over draws) against k for every sweep in metrics.json."""
    plots = []
    for key, title, entries in _sweeps(metrics):
        fig = _figure(6.4, 3.8)
        ax = fig.add_subplot()
        # the two series are dodged sideways and drawn in different line and marker styles, so
        # that neither hides the other where they coincide (e.g. both 0 for an untrained model)
        for rate, colour, dodge, style in (("tpr", "#d62728", -0.08, {"marker": "o", "ls": "-"}),
                                           ("fpr", "#1f77b4", 0.08, {"marker": "s", "ls": "--", "mfc": "white"})):
            pts = [(e["k"], e[rate], e.get(f"{rate}_std") or 0.0) for e in entries
                   if e.get("k") is not None and e.get(rate) is not None]
            if pts:
                ax.errorbar([p[0] + dodge for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                            color=colour, capsize=4, ms=7, mew=1.5, label=f"{rate.upper()} (mean ± std over draws)",
                            **style)
        missing = [e["k"] for e in entries if e.get("tpr") is None and e.get("k") is not None]
        for k in missing:
            ax.annotate("n/a", (k, 0.5), ha="center", color="grey")
        ax.set_xlabel("k (images per identity)")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.05, 1.05)
        ks = sorted({e["k"] for e in entries if e.get("k") is not None})
        ax.set_xticks(ks)
        if ks:
            ax.set_xlim(ks[0] - 0.5, ks[-1] + 0.5)
        ax.set_title(f"{title}: sweep over k", fontsize=10)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8)
        note = f"; no value at k = {', '.join(map(str, missing))} (too few identities with that many images)" \
            if missing else ""
        plots.append(Plot(f"sweep-{key}", f"sweep of {key} over k",
                          f"{key}: TPR and FPR against k, mean ± std over random draws{note}.", _png(fig)))
    return plots


# -- HTML --------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f2f2f2}pre{background:#f7f7f7;padding:.6em;font-size:.8em;
overflow-x:auto;white-space:pre-wrap}figure{display:inline-block;margin:.4em 0;vertical-align:top;width:49%}
.scroll{overflow-x:auto}
figcaption{font-size:.75em;color:#555}img{max-width:100%}
.warning{background:#fff3cd;border:2px solid #d9a400;padding:.6em 1em;margin:1em 0}.ok{color:#2a7a2a}
.mono{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-all}
.thumb{height:48px;margin-right:2px;border-radius:3px}
"""


class _Html(str):
    """A table cell that is already HTML (e.g. ``<img>`` tags): :func:`_table` does not escape it."""


def _table(header: list[str] | tuple[str, ...], rows: list, mono: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    cls = ' class="mono"'

    def cell(c: Any) -> str:
        return c if isinstance(c, _Html) else escape(_fmt(c))

    body = "".join("<tr>" + "".join(f"<td{cls if i in mono else ''}>{cell(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _figure_html(p: Plot) -> str:
    data = base64.b64encode(p.png).decode("ascii")
    return (f'<figure><img alt="{escape(p.alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(p.caption)}</figcaption></figure>")


#: thumbnails per identity with ``--thumbnails``, and their longest side in pixels
THUMBS_PER_IDENTITY = 3
THUMB_SIDE = 64


def thumbnails(layout: OutputLayout, identities: list[str]) -> dict[str, list[str]]:
    """Per identity, up to :data:`THUMBS_PER_IDENTITY` of its ok images (first by shard and
    position) as small JPEG data URIs, read back from the audited shards. Images that cannot be
    read any more (a moved shard) are left out."""
    from PIL import Image


    if not identities:
        return {}
    con = _connect(layout)
    try:
        con.register("wanted", pa.table({"identity": identities}))
        rows = con.execute(f"""SELECT identity, shard, key FROM (
                                 SELECT identity, shard, key, row_number() OVER (PARTITION BY identity
                                        ORDER BY shard, position) AS n
                                 FROM samples WHERE status = 'ok' AND identity IN (SELECT identity FROM wanted))
                               WHERE n <= {THUMBS_PER_IDENTITY} ORDER BY identity, shard, key""").fetchall()
    finally:
        con.close()
    options = _storage_options(_saved_spec_json(layout))  # a failure opening a URL leaves that shard unread
    by_shard: dict[str, dict[str, str]] = {}
    for ident, shard, key in rows:
        by_shard.setdefault(shard, {})[key] = ident
    found: dict[tuple[str, str], str] = {}
    for shard, keys in by_shard.items():
        try:
            for raw in iter_tar_samples(shard, options):
                ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
                if raw.key not in keys or ext is None:
                    continue
                try:
                    im = Image.open(io.BytesIO(raw.files[ext])).convert("RGB")
                    im.thumbnail((THUMB_SIDE, THUMB_SIDE))
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=80)
                except OSError:
                    continue
                found[(shard, raw.key)] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        except OSError:
            continue
    out: dict[str, list[str]] = {}
    for ident, shard, key in rows:
        if (shard, key) in found:
            out.setdefault(ident, []).append(found[(shard, key)])
    return out


def _top_identities(layout: OutputLayout, with_thumbnails: bool = False) -> str:
    if not layout.store.is_file(layout.identities):
        return "<p>no identities.parquet</p>"
    con = _connect(layout)
    try:
        cols = _columns(con, "identities")
        scores = [s for a in registered() for s in a.scores if s.metric in cols and
                  con.execute(f'SELECT count("{s.metric}") FROM identities').fetchone()[0]]
        flags = [c for c in cols if c.endswith("_flag")]
        pvals = [c for c in cols if c.endswith("_pvalue")]
        n_flags = " + ".join(f'coalesce("{c}", false)::INT' for c in flags) or "0"
        min_p = "least(" + ", ".join(f'coalesce("{c}", 1.0)' for c in pvals) + ")" if pvals else "1.0"
        first = f'"{scores[0].metric}" DESC NULLS LAST, ' if scores else ""
        label = "label_member" if "label_member" in cols else "NULL"
        sel = ", ".join([f'"{s.metric}"' for s in scores]
                        + [f'"{s.name}_pvalue"' if f"{s.name}_pvalue" in cols else "NULL" for s in scores]
                        + [f'"{c}"' for c in flags])
        ranked = "membership_qvalue" in cols  # the combined evidence, with a controlled false-discovery rate
        order = "membership_qvalue ASC NULLS LAST, " if ranked else "n_flags DESC, "
        q_sel = "membership_qvalue, membership_discovery" if ranked else "NULL, NULL"
        cur = con.execute(f"""SELECT identity, n_images, n_errors, {label}, {n_flags} AS n_flags, {q_sel}, {sel}
                              FROM identities ORDER BY {order}{min_p} ASC, {first}identity
                              LIMIT {TOP_IDENTITIES}""")
        rows = cur.fetchall()
        total = con.execute("SELECT count(*) FROM identities").fetchone()[0]
        found = con.execute("SELECT count(*) FILTER (WHERE membership_discovery) FROM identities").fetchone()[0] \
            if ranked else None
    finally:
        con.close()
    n = len(scores)
    out = []
    for r in rows:
        flagged = [c.removesuffix("_flag") for c, v in zip(flags, r[7 + 2 * n:]) if v]
        evidence = [f"{_fmt(v)} (p={_fmt(p)})" if p is not None else _fmt(v)
                    for v, p in zip(r[7:7 + n], r[7 + n:7 + 2 * n])]
        out.append([r[0], r[1], r[2], r[3], _fmt(r[5]), _fmt(r[6]), ", ".join(flagged) or "-", *evidence])
    header = ["identity", "images", "errors", "labelled member", "membership q-value", "discovery",
              "flagged (p ≤ target FPR)", *[f"{s.name} ({s.metric}, p-value)" for s in scores]]
    if ranked:
        fdr = (layout.read_json(layout.calibration) or {}).get("fdr")
        intro = (f"<p>{len(rows)} of {total} identities, ranked by their membership q-value (the attacks' p-values "
                 f"combined, Benjamini–Hochberg over the candidates): {found} discoveries at a false-discovery rate "
                 f"of {_fmt(fdr)}, of which about {_fmt(round((fdr or 0) * found, 2))} are expected to be false.</p>")
    else:
        intro = f"<p>{len(rows)} of {total} identities: most flags first, then the smallest p-value.</p>"
    if not with_thumbnails:
        return intro + _table(header, out)
    thumbs = thumbnails(layout, [r[0] for r in out])
    table = _table(["photos", *header], [[_Html("".join(f'<img class="thumb" alt="photo of {escape(r[0])}" src="{u}">'
                                                        for u in thumbs.get(r[0], []))), *r] for r in out])
    return (intro + "<p>Photos shown because the report was written with --thumbnails: this page holds "
            "personal data.</p>" + table)


def _provenance(layout: OutputLayout) -> str:
    parts = []
    m = layout.read_json(layout.manifest)
    if m is not None:
        model = m.get("model", {})
        rows = [("model", model.get("name")), ("pretrained", model.get("pretrained")),
                ("precision", model.get("precision")), ("checkpoint sha256", model.get("checkpoint_sha256")),
                ("map hash", m.get("map_hash")), ("started", m.get("started")), ("ended", m.get("ended")),
                ("seeds", json.dumps(m.get("seeds"))), ("host", json.dumps(m.get("host"))),
                ("shards", len(m.get("shards", [])))]
        job = layout.read_json(layout.job_state)
        if job is not None:
            rows.append(("map hash (_job.json)", job.get("map_hash")))
            labels = job.get("spec", {}).get("labels")
            rows.append(("labels", labels))
        parts.append(_table(["", "value"], rows, mono={1}))
        versions = m.get("versions", {})
        if versions:
            parts.append("<h3>package versions</h3>" + _table(["package", "version"], sorted(versions.items())))
        if m.get("spec_yaml"):
            parts.append(f"<h3>job spec</h3><pre>{escape(m['spec_yaml'])}</pre>")
    else:
        parts.append("<p>no manifest.json</p>")
    return "".join(parts)


def _errors(summary: dict) -> str:
    parts = [f"<p>{escape(line)}</p>" for line in summary_lines(summary)]
    errors = sorted(summary.get("errors", {}).items(), key=lambda kv: -kv[1])
    parts.append(_table(["error", "rows"], errors) if errors else '<p class="ok">no sample errors</p>')
    if summary.get("failed"):
        parts.append(_table(["failed shard", "attempts", "error"],
                            [(f["shard"], f["attempts"], f["error"]) for f in summary["failed"]]))
    return "".join(parts)


def build_html(layout: OutputLayout | Path, with_thumbnails: bool = False) -> tuple[str, list[Plot]]:
    """The page for an output (a folder, or a layout on a store) and the plots in it;
    ``with_thumbnails``: small photos of the top identities (personal data: only when asked for)."""
    layout = layout if isinstance(layout, OutputLayout) else OutputLayout(Path(layout))
    summary = layout.read_json(layout.summary)
    if summary is None:
        raise FileNotFoundError(no_audit(layout.where, layout.summary.name))
    if layout.store.is_file(layout.job_state):  # imports the job's attack plugins, so their plots are drawn too
        saved_spec(layout)
    _figure()  # fails early, naming the extra, when matplotlib is missing
    metrics = layout.read_json(layout.metrics) or {}
    rocs = roc_plots(layout, metrics)
    hists = histogram_plots(layout, metrics)
    sweeps = sweep_plots(metrics)
    sec: list[str] = [f"<h1>clipaudit audit report</h1><p class=\"mono\">{escape(_where(layout))}</p>"]
    warnings = shift_warnings(metrics)
    if metrics.get("distribution_shift_warning") or warnings:
        rule = metrics.get("shift_rule", "")
        sec.append('<div class="warning"><strong>Distribution shift</strong>'
                   + "".join(f"<p>{escape(w)}</p>" for w in warnings)
                   + (f"<p>Rule: {escape(rule)}</p>" if rule else "") + "</div>")
    sec.append(f"<h2>Run</h2><p>shards: {summary['shards_done']}/{summary['shards']} done, "
               f"{summary['shards_failed']} failed</p>" + _errors(summary))
    if metrics:
        sec.append("<h2>Metrics</h2>" + _table(METRICS_HEADER, metrics_rows(metrics))
                   + "".join(f"<p>{escape(line)}</p>" for line in shift_checks(metrics)))
    else:
        sec.append("<h2>Metrics</h2><p>no metrics.json (no labels): no ROC, no sweep</p>")
    if rocs:
        sec.append("<h2>ROC (log-log)</h2>" + "".join(map(_figure_html, rocs)))
    if hists:
        sec.append("<h2>Score distributions</h2>" + "".join(map(_figure_html, hists)))
    if sweeps:
        sec.append("<h2>Sweeps</h2>" + "".join(map(_figure_html, sweeps))
                   + "".join(f"<h3>{escape(key)}</h3>" + _table(sorted({k for e in entries for k in e}),
                                                                 [[e.get(k) for k in sorted({k for e in entries
                                                                                             for k in e})]
                                                                  for e in entries])
                             for key, _, entries in _sweeps(metrics)))
    sec.append("<h2>Top identities</h2>" + _top_identities(layout, with_thumbnails))
    calibration = layout.read_json(layout.calibration)
    if calibration is not None:
        cal = calibration_lines(calibration)
        sec.append(f"<h2>Calibration</h2><pre>{escape(chr(10).join(cal))}</pre>")
    sec.append("<h2>Provenance</h2>" + _provenance(layout))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>clipaudit report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(sec) + "\n</body></html>\n")
    return page, rocs + hists + sweeps


def _where(layout: OutputLayout) -> str:
    return layout.where if layout.store.remote else str(layout.root.resolve())


def write_html(layout: OutputLayout | Path, with_thumbnails: bool = False) -> Path:
    """Write ``OUT/report.html`` and the PNGs under ``OUT/report/`` (on the output's store);
    returns the page's path in the layout."""
    layout = layout if isinstance(layout, OutputLayout) else OutputLayout(Path(layout))
    page, plots = build_html(layout, with_thumbnails)
    folder = layout.root / "report"
    layout.make_dirs()
    layout.store.remove(*layout.store.glob(folder, ".png"))
    for p in plots:
        layout.write_bytes(folder / f"{p.stem}.png", p.png)
    out = layout.root / "report.html"
    layout.write_bytes(out, page.encode("utf-8"))  # the page last: it names the PNGs
    return out
