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

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..data.samples import normalize_name
from ..index import NameIndex, build_name_index
from ..models import LoadedModel
from .base import MapBatch

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


class NamePoolError(ValueError):
    """The name pool file is empty or unreadable."""


def load_name_pool(path: str | Path) -> list[str]:
    """One name per line; names are normalised, blank lines and repeats dropped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise NamePoolError(f"names: {path} is not UTF-8 text: {e}") from None
    seen: dict[str, None] = {}
    for line in lines:
        name = normalize_name(line)
        if name:
            seen.setdefault(name, None)
    if not seen:
        raise NamePoolError(f"names: {path} holds no names")
    return list(seen)


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

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("idia_true_rank", pa.list_(pa.int32())),
            pa.field("idia_top1", pa.list_(pa.string())),
        ]

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

def identity_scores_sql(samples: str, tau: int) -> str:
    """SQL (DuckDB) giving per identity: idia_score, idia_member, idia_top1_rate.

    ``samples`` is a relation with ok rows only. A template's vote goes to the true name
    only when it is predicted strictly more often than every other name.
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
    ranks AS (
        SELECT identity,
               avg(CASE WHEN r = 1 THEN 1.0 ELSE 0.0 END) AS idia_top1_rate,
               avg(CASE WHEN r IS NOT NULL THEN 1.0 / r ELSE 0.0 END) AS idia_mean_reciprocal_rank
        FROM (SELECT identity, unnest(idia_true_rank) AS r FROM {samples} WHERE idia_true_rank IS NOT NULL)
        GROUP BY ALL
    )
    SELECT v.identity,
           CAST(count(*) FILTER (WHERE n_true > n_other) AS INTEGER) AS idia_score,
           count(*) FILTER (WHERE n_true > n_other) >= {int(tau)} AS idia_member,
           any_value(r.idia_top1_rate) AS idia_top1_rate,
           any_value(r.idia_mean_reciprocal_rank) AS idia_mean_reciprocal_rank
    FROM votes v LEFT JOIN ranks r USING (identity)
    GROUP BY v.identity
    """
