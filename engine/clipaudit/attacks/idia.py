"""IDIA — identity inference (after Hintersdorf et al.).

Map side: for every image and every prompt template, rank the whole name pool by
image–text similarity and keep the true name's rank (1-based, null beyond ``top_k`` or
when the name is not in the pool) and the top-1 name.

Reduce side: per identity and template, a plurality vote over the identity's images —
the true name must be predicted strictly more often than any other name (a tie is no
vote). ``idia_score`` counts the templates whose vote is the true name; an identity is a
member when ``idia_score >= tau``.

As in the paper, the evidence is also computed at a fixed number of images per person
(the sweep): for each k, ``draws`` random draws of k of the identity's images (seeded per
identity) and the vote on each draw. Every metric at k — AUC, TPR, FPR, the sweep's and the
headline's — is computed on one draw per identity and averaged over draws (mean ± std), so
no figure pools more than k images of a person. The sweep's population is fixed across k by
default (identities with at least max(k) images). The headline uses one k for everybody;
``idia_score_at_k`` (the mean score over the draws at that k) is what identities.parquet
shows per person, and its p-value is computed on it, controls at the same k.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clipaudit.data.names import load_name_pool
from clipaudit.model.name_index import NameIndex, build_name_index
from clipaudit.model.loading import LoadedModel
from clipaudit.attacks.base import MapBatch
from clipaudit.core.statistics import auc
from clipaudit.contract.registry import AnalysisInput, Attack, Column, IdentityAnalysis, Score, register

#: Prompt templates in the style of the IDIA paper (our own wording).
DEFAULT_TEMPLATES: list[str] = [
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "a portrait of {}.",
    "a close-up photo of {}.",
    "a headshot of {}.",
    "{} in a photo.",
    "a photograph showing {}.",
    "a snapshot of {}.",
    "a cropped photo of {}.",
    "a candid photo of {}.",
    "a press photo of {}.",
    "an old photo of {}.",
    "a recent photo of {}.",
    "a blurry photo of {}.",
    "a bright photo of {}.",
    "a dark photo of {}.",
    "a good photo of {}.",
    "a low-resolution photo of {}.",
    "{} posing for the camera.",
    "this is {}.",
]


class IdiaParams(BaseModel):
    """Identity inference: zero-shot name ranking over prompt templates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tau: int = Field(1, ge=1, description="member if the true name wins at least tau templates")
    top_k: int = Field(10, ge=1, le=1000, description="ranks beyond top_k are stored as null")
    templates: Literal["default"] | list[str] = "default"
    k: list[int] = Field(default_factory=lambda: [1, 3, 5, 10], min_length=1,
                         description="images per identity for the sweep (reduce only)")
    draws: int = Field(20, ge=1, le=1000, description="random draws of k images per identity and k (reduce only)")
    population: Literal["fixed", "per_k"] = Field(
        "fixed", description="the sweep's identities: fixed (the labelled identities with at least max(k) images, the "
                             "same people at every k, as in the paper) or per_k (at each k, those with at least k)")
    headline_k: int | None = Field(None, ge=1, description="k of the headline metrics; default: the largest k in "
                                                           "the list that 90 % of the labelled identities reach")
    missing_names: Literal["error", "exclude"] = Field(
        "error", description="a labelled or control identity whose name is not in the pool: error (stop at "
                             "--dry-run and run, naming it) or exclude (leave it out of IDIA's figures, with a note)")
    template_average: bool = Field(
        False, description="average each name's template embeddings into one vector (CLIP's prompt ensemble) and "
                           "rank names once per image: T times less index work; IDIA then votes over that one "
                           "ranking, so tau must be 1")

    @model_validator(mode="after")
    def _one_vote_when_averaged(self) -> IdiaParams:
        if self.template_average and self.tau > 1:
            raise ValueError(f"template_average leaves one ranking per image, so tau must be 1 (got {self.tau})")
        return self

    @field_validator("k")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"k must be distinct image counts >= 1, got {v}")
        return sorted(v)

    @field_validator("templates")
    @classmethod
    def _placeholders(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("templates must not be empty")
            bad = [t for t in v if t.count("{}") != 1]
            if bad:
                raise ValueError(f"each template needs exactly one '{{}}' for the name; bad: {bad[:3]}")
            if len(set(v)) != len(v):
                raise ValueError("templates contain duplicates")
        return v


def resolve_templates(templates: str | list[str]) -> list[str]:
    return list(DEFAULT_TEMPLATES) if templates == "default" else list(templates)


class IdiaAttack:
    """Map-side IDIA: per-template true-name rank and top-1 name for each image."""

    name = "idia"

    def __init__(self, names: list[str], templates: list[str], top_k: int, average: bool = False) -> None:
        self.names = names
        self.templates = templates
        self.average = average  # one ranking per image over the templates' mean embedding
        self.top_k = min(top_k, len(names))
        self._name_id = {n: i for i, n in enumerate(names)}
        self._index: NameIndex | None = None

    @property
    def state_items(self) -> int:
        return len(self.names)

    def state_params(self) -> dict[str, Any]:
        pool = hashlib.sha256("\n".join(self.names).encode()).hexdigest()
        return {"names_sha256": pool, "names": len(self.names), "templates": self.templates, "average": self.average}

    def state_slice(self, model: LoadedModel, start: int, stop: int) -> np.ndarray:
        """Text embeddings of every (template, name) for names ``[start, stop)``: T×n×D float16;
        with ``average`` 1×n×D, the mean of each name's unit template embeddings, normalised again."""
        names = self.names[start:stop]
        per_template = [model.encode_texts([t.format(n) for n in names]).to(torch.float16).cpu().numpy()
                        for t in self.templates]
        state = np.stack(per_template)
        if self.average:
            mean = state.astype(np.float32).mean(0, keepdims=True)
            state = (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float16)
        return state

    def bind(self, state: list[np.ndarray] | None, model: LoadedModel, index_backend: str) -> None:
        """Build the name index from the state's parts (read as they are, fp16, never copied whole)."""
        if state is None:
            raise ValueError("idia: bind() needs the name state")
        rankings = 1 if self.average else len(self.templates)
        shape = (state[0].shape[0] if len(state) else 0, sum(p.shape[1] for p in state))
        if shape != (rankings, len(self.names)):
            raise ValueError(f"name embeddings have shape {shape}, expected T={rankings} N={len(self.names)}")
        self._index = build_name_index(state, index_backend, model.device)

    def compute(self, batch: MapBatch) -> dict[str, list]:
        assert self._index is not None, "bind() first"
        samples = batch.samples
        _, ids = self._index.search(batch.emb, self.top_k)  # T×B×k
        true_ids = np.array([self._name_id.get(s.identity or "", -1) for s in samples])
        hits = ids == true_ids[None, :, None]  # T×B×k
        found = hits.any(-1)
        rank = hits.argmax(-1) + 1
        names = np.asarray(self.names, dtype=object)
        top1 = names[ids[:, :, 0]]  # T×B
        ranks_out, top1_out = [], []
        for b in range(len(samples)):
            ranks_out.append([int(rank[t, b]) if found[t, b] else None for t in range(ids.shape[0])])
            top1_out.append(list(top1[:, b]))
        return {"idia_true_rank": ranks_out, "idia_top1": top1_out}


# -- reduce side -----------------------------------------------------------------

def identity_scores_sql(samples: str, params: IdiaParams) -> str:
    """SQL (DuckDB): per identity with ok rows, ``idia_top1_rate`` and
    ``idia_mean_reciprocal_rank`` — one aggregate per identity. The vote itself
    (``idia_score``, ``idia_member``) is counted in :func:`analyse`, which streams each
    identity's top-1 names once: a GROUP BY over (identity, template, name) would hold up to
    images × templates groups, more than a bounded memory allows at 10^7 images."""
    return f"""
    WITH ranks AS (
        SELECT identity,
               avg(CASE WHEN r = 1 THEN 1.0 ELSE 0.0 END) AS idia_top1_rate,
               -- summed as exact decimals: a float sum would depend on the order DuckDB's threads add in
               avg(CASE WHEN r IS NOT NULL THEN CAST(1.0 / r AS DECIMAL(38, 28)) ELSE 0 END)
                   AS idia_mean_reciprocal_rank
        FROM (SELECT identity, unnest(idia_true_rank) AS r FROM {samples} WHERE idia_true_rank IS NOT NULL)
        GROUP BY ALL
    )
    SELECT ids.identity, ranks.idia_top1_rate, ranks.idia_mean_reciprocal_rank
    FROM (SELECT DISTINCT identity FROM {samples}) ids LEFT JOIN ranks USING (identity)
    """


def vote(top1: np.ndarray, true_id: int) -> int:
    """Templates whose plurality vote over all of an identity's images (n×T name ids) is the
    true name: predicted strictly more often than any other name (a tie is no vote)."""
    n = len(top1)
    return int(plurality_scores(top1, true_id, n, 1, 0)[0]) if n else 0  # a draw of all n is every image


#: share of the (labelled) identities that must have at least k images for k to be the headline
HEADLINE_COVERAGE = 0.9


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def plurality_scores(top1: np.ndarray, true_id: int, k: int, draws: int, seed: int) -> np.ndarray:
    """IDIA scores of ``draws`` random draws of ``k`` images: top1 is n_images×T name ids; per
    draw and template the vote goes to the true name only when it is predicted strictly more
    often than any other name. Returns ``draws`` template counts."""
    n, t = top1.shape
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(draws)])  # D×k
    sub = top1[idx]  # D×k×T
    is_true = sub == true_id
    n_true = is_true.sum(1)  # D×T
    # the most frequent other name: true entries become distinct negatives, so they form no runs
    other = np.where(is_true, -1 - np.arange(k)[None, :, None], sub)
    s = np.sort(other, axis=1)
    pos = np.arange(k)[None, :, None]
    starts = np.ones_like(s, dtype=bool)
    starts[:, 1:, :] = s[:, 1:, :] != s[:, :-1, :]
    run = pos - np.maximum.accumulate(np.where(starts, pos, 0), axis=1) + 1
    n_other = np.where(s >= 0, run, 0).max(1)  # D×T
    return (n_true > n_other).sum(1)


#: rows per batch when the identities' top-1 names stream out of DuckDB
STREAM_ROWS = 65_536


#: the id of an identity's own name in the top-1 ids :func:`_top1_by_identity` yields
OWN = -1


def _top1_by_identity(con) -> Iterator[tuple[str, np.ndarray]]:
    """Per identity with ok rows, in name order: its name and its images' top-1 name ids (n×T),
    :data:`OWN` for its own name. Streams sorted batches from DuckDB (which spills the sort to
    disk beyond its memory limit), so memory holds one batch and one identity, not the audit.
    Name ids are only compared within one identity, so each batch encodes its own; an identity
    that goes on into the next batch is encoded from its names once it is complete."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rel = con.sql("SELECT identity, idia_top1 FROM ok WHERE idia_top1 IS NOT NULL ORDER BY identity, shard, position")
    # DuckDB 2 names it to_arrow_reader, DuckDB 1 record_batch
    reader = rel.to_arrow_reader(STREAM_ROWS) if hasattr(rel, "to_arrow_reader") else rel.record_batch(STREAM_ROWS)
    carry: tuple[str, int, list[pa.Array]] | None = None  # (name, templates, its top-1 names so far)

    def finished(c: tuple[str, int, list[pa.Array]]) -> tuple[str, np.ndarray]:
        return c[0], _own_coded(pa.concat_arrays(c[2]), c[0], c[1])

    for batch in reader:
        if not batch.num_rows:
            continue
        lists, idents = batch.column(1), batch.column(0)
        t = int(pc.list_value_length(lists)[0].as_py())
        flat = pc.list_flatten(lists)
        codes = pa.concat_arrays([flat, idents]).dictionary_encode().indices.to_numpy(zero_copy_only=False)
        top1, own = codes[: len(flat)].reshape(-1, t), codes[len(flat):]
        ident = idents.to_numpy(zero_copy_only=False)
        bounds = np.r_[0, np.flatnonzero(ident[1:] != ident[:-1]) + 1, len(ident)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            name = str(ident[a])
            if carry is not None and carry[0] != name:
                yield finished(carry)
                carry = None
            if b == len(ident) or carry is not None:  # may continue in the next batch: keep the names
                piece = flat.slice(a * t, (b - a) * t)
                carry = (name, t, [piece]) if carry is None else (name, t, carry[2] + [piece])
                if b < len(ident):
                    yield finished(carry)
                    carry = None
                continue
            yield name, np.where(top1[a:b] == own[a], OWN, top1[a:b])
    if carry is not None:
        yield finished(carry)


def _own_coded(flat: pa.Array, name: str, t: int) -> np.ndarray:
    """One identity's top-1 names (flat, ``t`` per image) as ids: :data:`OWN` for its own name."""
    import pyarrow.compute as pc

    codes = flat.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(pc.equal(flat, name).to_numpy(zero_copy_only=False), OWN, codes).reshape(-1, t)


def analyse(inp: AnalysisInput) -> IdentityAnalysis:
    """The sweep over images per identity and the headline score at a fixed k."""
    p: IdiaParams = inp.params
    excluded = inp.excluded
    labels = {n: v for n, v in (inp.labels or {}).items() if n not in excluded}
    ks = sorted(set(p.k))
    names: list[str] = []
    counts: list[int] = []
    # per identity and k: the scores of the draws (float32, nan below k): identities × ks × draws
    per_draw: list[np.ndarray] = []
    head = p.headline_k if p.headline_k and p.headline_k not in ks else None
    votes: dict[str, int] = {}
    for name, x in _top1_by_identity(inp.con):
        names.append(name)
        counts.append(len(x))
        votes[name] = vote(x, OWN)
        row = np.full((len(ks) + (head is not None), p.draws), np.nan, dtype=np.float32)
        for j, k in enumerate(ks + ([head] if head else [])):
            if len(x) >= k:
                row[j] = plurality_scores(x, OWN, k, p.draws, _stable_seed(inp.seed, name, k))
        per_draw.append(row)
    counts_arr = np.array(counts, dtype=np.int64)
    scores_by_k = np.stack(per_draw, axis=1) if per_draw else np.empty((len(ks) + (head is not None), 0, p.draws))
    all_ks = ks + ([head] if head else [])
    labelled = np.array([labels.get(n) is not None for n in names], dtype=bool)
    basis = counts_arr[labelled] if labelled.any() else counts_arr
    reached = [k for k in p.k if basis.size and (basis >= k).mean() >= HEADLINE_COVERAGE]
    k_head = p.headline_k or (max(reached) if reached else None)
    metrics: dict[str, Any] = {"k": k_head, "draws": p.draws}
    if k_head is None:
        metrics["k_note"] = (f"no k in {p.k} is reached by {HEADLINE_COVERAGE:.0%} of the identities: the headline "
                             "compares identities by all their images, whatever their number")
    if inp.labels is not None:
        floor = max(ks) if p.population == "fixed" else None  # fixed: the same people at every k
        metrics["population"] = (f"fixed: the labelled identities with at least {floor} images at every k"
                                 if floor else "per_k: at each k, the labelled identities with at least k images")
        metrics["sweep"] = [_sweep_entry(k, scores_by_k[all_ks.index(k)].astype(float), names, labels, p.tau,
                                         p.draws, None if floor is None else counts_arr >= floor) for k in p.k]
        if floor and not all(e["n_members"] and e["n_nonmembers"] for e in metrics["sweep"]):
            metrics["population_note"] = (f"the fixed population (at least {floor} images) lacks members or "
                                          "non-members: lower the largest k or set attacks.idia.population: per_k")
        if k_head is None:
            metrics["k_note"] += _imbalance(names, counts_arr, labels)
        else:
            y = np.array([labels.get(n) is not None for n in names], dtype=bool)
            metrics["n_short"] = int((y & (counts_arr < k_head)).sum())
            metrics["n_short_note"] = (f"{metrics['n_short']} labelled identities have fewer than k = {k_head} "
                                       "images and are not in the headline")
    at_k = scores_by_k[all_ks.index(k_head)].astype(float) if k_head else None
    column = dict(zip(names, at_k.mean(1).tolist())) if k_head else {}
    column = {n: (float("nan") if n in excluded else v) for n, v in column.items()}
    draws = ({n: at_k[i] for i, n in enumerate(names) if n not in excluded and not np.isnan(at_k[i, 0])}
             if k_head else {})
    if excluded:
        metrics["missing_names"] = {
            "excluded": len(excluded), "identities": sorted(excluded)[:20],
            "note": f"{len(excluded)} labelled or control identities are not in the name pool and are left out of "
                    "IDIA's figures and p-values (attacks.idia.missing_names: exclude); their idia_score_at_k is null"}
    if k_head and all(v != v for v in column.values()):  # headline_k that nobody reaches: say so, use all images
        metrics.update(k=None, k_note=f"headline_k = {k_head}: no identity has that many images; the headline "
                                      "compares identities by all their images, whatever their number")
        column, draws = {}, {}
        metrics.pop("n_short", None), metrics.pop("n_short_note", None)
    return IdentityAnalysis({"idia_score": votes, "idia_member": {n: v >= p.tau for n, v in votes.items()},
                             "idia_score_at_k": {n: (None if v != v else v) for n, v in column.items()}}, metrics,
                            draws={"idia_score_at_k": draws} if draws else {})


def _imbalance(names: list[str], counts: np.ndarray, labels: dict[str, bool]) -> str:
    m = [c for n, c in zip(names, counts) if labels.get(n) is True]
    nm = [c for n, c in zip(names, counts) if labels.get(n) is False]
    if not m or not nm:
        return ""
    return f" (median images per member {np.median(m):g}, per non-member {np.median(nm):g})"


def _sweep_entry(k: int, scores: np.ndarray, names: list[str], labels: dict[str, bool], tau: int,
                 draws: int, population: np.ndarray | None = None) -> dict[str, Any]:
    """TPR, FPR and AUC at k, each per draw and averaged; ``population``: the identities that
    may enter (None: all with at least k images)."""
    y = np.array([labels.get(n) for n in names], dtype=object)
    have = ~np.isnan(scores[:, 0]) if len(scores) else np.zeros(0, dtype=bool)
    if population is not None:
        have &= population
    mem, non = have & (y == True), have & (y == False)  # noqa: E712 (object array of bool/None)
    short = int(((y == True) | (y == False)).sum() - mem.sum() - non.sum())  # noqa: E712
    decided = scores >= tau
    entry: dict[str, Any] = {"k": k, "draws": draws, "n_members": int(mem.sum()), "n_nonmembers": int(non.sum()),
                             "n_short": short}
    tpr = decided[mem].mean(0) if mem.any() else None
    fpr = decided[non].mean(0) if non.any() else None
    entry.update(tpr=None if tpr is None else float(tpr.mean()), tpr_std=None if tpr is None else float(tpr.std()),
                 fpr=None if fpr is None else float(fpr.mean()), fpr_std=None if fpr is None else float(fpr.std()))
    both = mem | non
    entry["auc"] = entry["auc_std"] = None
    if mem.any() and non.any():  # per draw of k images, then averaged: never pooled across draws
        per_draw = [auc(scores[both, d], mem[both]) for d in range(scores.shape[1])]
        entry["auc"], entry["auc_std"] = float(np.mean(per_draw)), float(np.std(per_draw))
    return entry


IDIA = register(Attack(
    name="idia",
    position=0,
    title="IDIA (identity inference)",
    params=IdiaParams,
    build=lambda p, job: IdiaAttack(load_name_pool(job.names, job.data.storage_options),
                                    resolve_templates(p.templates), p.top_k, p.template_average),
    default=True,
    reduce_only=frozenset({"tau", "k", "draws", "headline_k", "missing_names", "population"}),
    columns=(
        Column("idia_true_rank", pa.list_(pa.int32()), "per template: 1-based rank of the true name; null beyond "
                                                        "top_k or when the name is not in the pool"),
        Column("idia_top1", pa.list_(pa.string()), "per template: the name ranked first"),
    ),
    scores=(Score("idia", "identity", metric_column="idia_score_at_k"),),
    identity_columns=(
        Column("idia_score", pa.int32(), "templates whose plurality vote is the true name (higher = more "
                                         "member-like)"),
        Column("idia_member", pa.bool_(), "idia_score >= tau"),
        Column("idia_top1_rate", pa.float64(), "fraction of (image, template) pairs whose top-1 name is the true "
                                               "name"),
        Column("idia_mean_reciprocal_rank", pa.float64(), "mean of 1/rank over (image, template) pairs; 0 beyond "
                                                          "top_k"),
        Column("idia_score_at_k", pa.float64(), "mean idia_score over random draws of k images of the identity (k: "
                                                "metrics.json idia.k); its p-value is computed on it; null with "
                                                "fewer than k images. The headline metrics are per draw, averaged"),
    ),
    identity_sql=identity_scores_sql,
    analyse=analyse,
))
