"""Shared machinery of the image-side attacks: embed many derived views per image in
chunks that fit the device, and compare them with the image's own embedding."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from clipaudit.attacks.augment import sample_rng
from clipaudit.attacks.base import MapBatch


def per_image_rngs(batch: MapBatch, stream: str) -> list[np.random.Generator]:
    return [sample_rng(batch.seed, s.key, s.position, stream) for s in batch.samples]


def source_canvas(batch: MapBatch, start: int, stop: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The originals of images ``start:stop`` as one float tensor in [0, 1] on the model's
    device, each in the top-left corner of a canvas of the group's largest height and width,
    padded by repeating its edge pixels (so a crop touching the edge interpolates as a resize
    would, never from another image or black); and each original's (width, height). Without
    ``batch.sources``, the model-sized images themselves."""
    if batch.sources is None:
        images = batch.images[start:stop]
        return images, [(images.shape[-1], images.shape[-2])] * len(images)
    sources = batch.sources[start:stop]
    height = max(s.shape[0] for s in sources)
    width = max(s.shape[1] for s in sources)
    canvas = np.stack([np.pad(s, ((0, height - s.shape[0]), (0, width - s.shape[1]), (0, 0)), mode="edge")
                       for s in sources])
    return batch.model.to_unit(torch.from_numpy(canvas)), [(s.shape[1], s.shape[0]) for s in sources]


def embed_views(batch: MapBatch, per_image: int, stream: str, make: Callable[..., torch.Tensor],
                from_source: bool = False) -> torch.Tensor:
    """Embeddings of ``per_image`` derived views of every image: B×per_image×D.

    ``make(images, rngs)`` returns the views of a group of images, image-major; with
    ``from_source``, ``make(canvas, rngs, sizes)`` cuts them from the originals (see
    :func:`source_canvas`) at the model's input size. Groups are sized so one group's views
    fit in one forward chunk.
    """
    rngs = per_image_rngs(batch, stream)
    group = max(1, batch.chunk // per_image)
    out = []
    for i in range(0, len(rngs), group):
        if from_source:
            canvas, sizes = source_canvas(batch, i, i + group)
            views = make(canvas, rngs[i : i + group], sizes)
        else:
            views = make(batch.images[i : i + group], rngs[i : i + group])
        out.append(batch.model.encode_unit(views, batch.chunk))
    emb = torch.cat(out)
    return emb.view(len(rngs), per_image, -1)


def quantile_summary(x: torch.Tensor, q: int = 11) -> torch.Tensor:
    """B×k values → B×(q + 2): q evenly spaced quantiles, mean and std."""
    qs = torch.linspace(0, 1, q, device=x.device)
    return torch.cat([torch.quantile(x, qs, dim=1).T, x.mean(1, keepdim=True),
                      x.std(1, keepdim=True, unbiased=False)], 1)


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.float().cpu().numpy().round(5).tolist()


def scale_range(v: tuple[float, float]) -> tuple[float, float]:
    """Validate a crop-area range (0 < low <= high <= 1)."""
    lo, hi = v
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {list(v)}")
    return v
