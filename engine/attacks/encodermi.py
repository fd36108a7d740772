"""EncoderMI (after Liu et al.): an overfitted encoder maps augmented views of a training
image to more similar embeddings.

Map side: n views per image (random resized crop, flip, colour jitter, grayscale — drawn
per image on the device), the n(n−1)/2 pairwise cosines of their embeddings, sorted
(``encodermi_features``, the "vector"/"set" attack input) and their mean
(``encodermi_score``, the threshold attack). Higher = more member-like.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from .augment import encodermi_views
from .base import MapBatch, StatelessAttack
from .views import embed_views, rows


class EncoderMIAttack(StatelessAttack):
    name = "encodermi"

    def __init__(self, views: int = 10, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.views = views
        self.scale = scale

    def fields(self) -> list[pa.Field]:
        return [pa.field("encodermi_score", pa.float32()), pa.field("encodermi_features", pa.list_(pa.float32()))]

    def compute(self, batch: MapBatch) -> dict[str, list]:
        n = self.views
        emb = embed_views(batch, n, "encodermi", lambda im, rngs: encodermi_views(im, rngs, n, self.scale))
        sim = emb @ emb.transpose(1, 2)  # B×n×n
        iu = torch.triu_indices(n, n, offset=1, device=sim.device)
        pairs = sim[:, iu[0], iu[1]].sort(dim=1).values
        return {"encodermi_score": pairs.mean(1).tolist(), "encodermi_features": rows(pairs)}
