"""IDIA — identity inference (after Hintersdorf et al.).

Map side: for every image and every prompt template, rank the whole name pool by
image–text similarity and keep the true name's rank (1-based, null beyond ``top_k`` or
when the name is not in the pool) and the top-1 name.

Reduce side: per identity and template, a plurality vote over the identity's images —
the true name must be predicted strictly more often than any other name (a tie is no
vote). ``idia_score`` counts the templates whose vote is the true name; an identity is a
member when ``idia_score >= tau``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data.names import load_name_pool
from ..map.index import NameIndex, build_name_index
from ..map.models import LoadedModel
from .base import MapBatch
from .registry import Attack, Column, Score, register

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

    def __init__(self, names: list[str], templates: list[str], top_k: int) -> None:
        self.names = names
        self.templates = templates
        self.top_k = min(top_k, len(names))
        self._name_id = {n: i for i, n in enumerate(names)}
        self._index: NameIndex | None = None

    def shared_state(self, model: LoadedModel) -> np.ndarray:
        """Text embeddings of every (template, name): T×N×D float16."""
        per_template = []
        for template in self.templates:
            texts = [template.format(n) for n in self.names]
            per_template.append(model.encode_texts(texts).to(torch.float16).cpu().numpy())
        return np.stack(per_template)

    def bind(self, state: np.ndarray, model: LoadedModel, index_backend: str) -> None:
        if state.shape[:2] != (len(self.templates), len(self.names)):
            raise ValueError(f"name embeddings have shape {state.shape}, expected T={len(self.templates)} N={len(self.names)}")
        self._index = build_name_index(state.astype(np.float32), index_backend, model.device)

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
    """SQL (DuckDB): per identity with ok rows, ``idia_score``, ``idia_member``,
    ``idia_top1_rate`` and ``idia_mean_reciprocal_rank``.

    ``samples`` is a relation with ok rows only. A template's vote goes to the true name
    only when it is predicted strictly more often than every other name; an identity
    without a winning template scores 0.
    """
    return f"""
    WITH per_image AS (
        SELECT identity, unnest(idia_top1) AS name, unnest(range(len(idia_top1))) AS template
        FROM {samples} WHERE idia_top1 IS NOT NULL
    ),
    counts AS (
        SELECT identity, template, name, count(*) AS n FROM per_image GROUP BY ALL
    ),
    votes AS (
        SELECT identity, template,
               coalesce(max(n) FILTER (WHERE name = identity), 0) AS n_true,
               coalesce(max(n) FILTER (WHERE name <> identity), 0) AS n_other
        FROM counts GROUP BY ALL
    ),
    won AS (
        SELECT identity, CAST(count(*) FILTER (WHERE n_true > n_other) AS INTEGER) AS n FROM votes GROUP BY ALL
    ),
    ranks AS (
        SELECT identity,
               avg(CASE WHEN r = 1 THEN 1.0 ELSE 0.0 END) AS idia_top1_rate,
               avg(CASE WHEN r IS NOT NULL THEN 1.0 / r ELSE 0.0 END) AS idia_mean_reciprocal_rank
        FROM (SELECT identity, unnest(idia_true_rank) AS r FROM {samples} WHERE idia_true_rank IS NOT NULL)
        GROUP BY ALL
    )
    SELECT ids.identity,
           coalesce(won.n, 0) AS idia_score,
           coalesce(won.n, 0) >= {int(params.tau)} AS idia_member,
           ranks.idia_top1_rate,
           ranks.idia_mean_reciprocal_rank
    FROM (SELECT DISTINCT identity FROM {samples}) ids
    LEFT JOIN won USING (identity) LEFT JOIN ranks USING (identity)
    """


IDIA = register(Attack(
    name="idia",
    title="IDIA (identity inference)",
    params=IdiaParams,
    build=lambda p, job: IdiaAttack(load_name_pool(job.names), resolve_templates(p.templates), p.top_k),
    default=True,
    reduce_only=frozenset({"tau"}),
    columns=(
        Column("idia_true_rank", pa.list_(pa.int32()), "per template: 1-based rank of the true name; null beyond "
                                                        "top_k or when the name is not in the pool"),
        Column("idia_top1", pa.list_(pa.string()), "per template: the name ranked first"),
    ),
    scores=(Score("idia", "identity"),),
    identity_columns=(
        Column("idia_score", pa.int32(), "templates whose plurality vote is the true name (higher = more "
                                         "member-like)"),
        Column("idia_member", pa.bool_(), "idia_score >= tau"),
        Column("idia_top1_rate", pa.float64(), "fraction of (image, template) pairs whose top-1 name is the true "
                                               "name"),
        Column("idia_mean_reciprocal_rank", pa.float64(), "mean of 1/rank over (image, template) pairs; 0 beyond "
                                                          "top_k"),
    ),
    identity_sql=identity_scores_sql,
))
