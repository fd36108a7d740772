"""Image–caption cosine (after M^4I's metric-based attack and CLIP cosine attacks).

``caption_score`` is the cosine between the image and its own caption (``{key}.txt``)
under the audited model; null when the sample has no caption. Higher = more member-like.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..models import LoadedModel
from .base import MapBatch


class CaptionAttack:
    name = "caption"

    def __init__(self) -> None:
        self._model: LoadedModel | None = None

    def fields(self) -> list[pa.Field]:
        return [pa.field("caption_score", pa.float32())]

    def shared_state(self, model: LoadedModel) -> Any:
        return None

    def bind(self, state: Any, model: LoadedModel, index_backend: str) -> None:
        self._model = model

    def compute(self, batch: MapBatch) -> dict[str, list]:
        assert self._model is not None, "bind() first"
        samples, image_emb = batch.samples, batch.emb
        with_caption = [i for i, s in enumerate(samples) if s.caption]
        scores: list[float | None] = [None] * len(samples)
        if with_caption:
            text = self._model.encode_texts([samples[i].caption for i in with_caption])  # type: ignore[misc]
            cos = (image_emb[with_caption].to(text.device) * text).sum(-1).cpu().tolist()
            for i, c in zip(with_caption, cos):
                scores[i] = float(c)
        return {"caption_score": scores}


def identity_aggregates_sql(samples: str) -> str:
    """Per identity: mean caption cosine over ok rows that have one."""
    return f"SELECT identity, avg(caption_score) AS caption_score FROM {samples} GROUP BY identity"
