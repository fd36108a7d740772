"""Batched, per-image-random views on the device: crops, flips, colour jitter, grayscale,
patch masks.

A torchvision v2 transform applied to a batch tensor draws ONE set of random parameters
for the whole batch. Here every image (and every view of it) gets its own parameters,
drawn on the CPU from a generator seeded by the job seed and the sample's key — so a
shard recomputed anywhere, in any batch composition, gives the same views — and applied
to the whole batch at once on the device (``roi_align`` for crops, masked ``where`` for
flips/grayscale, vectorised HSV for hue).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def sample_rng(seed: int, key: str | None, position: int, stream: str) -> np.random.Generator:
    """A generator that depends only on (job seed, sample key, purpose)."""
    ident = key if key is not None else f"#{position}"
    digest = hashlib.sha256(f"{seed}\x00{stream}\x00{ident}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_resized_boxes(rng: np.random.Generator, n: int, size: int | tuple[int, int], scale: tuple[float, float],
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """``n`` crop boxes (x1, y1, x2, y2) in pixels inside an image of ``size`` (side, or
    (width, height)), sampled like RandomResizedCrop: area fraction in ``scale``, aspect in
    ``ratio``, else the centred crop torchvision falls back to."""
    width, height = (size, size) if isinstance(size, int) else size
    boxes = np.empty((n, 4), dtype=np.float32)
    area = float(width * height)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_r))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x = rng.integers(0, width - w + 1)
                y = rng.integers(0, height - h + 1)
                boxes[i] = (x, y, x + w, y + h)
                break
        else:  # as torchvision: the whole image, its aspect clamped into ``ratio``
            w, h = width, height
            if width / height < ratio[0]:
                h = round(width / ratio[0])
            elif width / height > ratio[1]:
                w = round(height * ratio[1])
            x, y = (width - w) / 2, (height - h) / 2
            boxes[i] = (x, y, x + w, y + h)
    return boxes


def crop_resize(images: torch.Tensor, boxes: list[np.ndarray], out_size: int) -> torch.Tensor:
    """images B×C×H×W, boxes[b] k_b×4 → (Σk_b)×C×out×out, bilinear, image order kept."""
    idx = np.concatenate([np.full(len(b), i, dtype=np.float32) for i, b in enumerate(boxes)])
    rois = np.concatenate([idx[:, None], np.concatenate(boxes)], axis=1)
    rois_t = torch.from_numpy(rois).to(images.device, images.dtype)
    # imported here: torchvision's import costs ~1.6 s on the 2-core machine, which every reduce
    # step (it imports the attack modules for their reduce-side code) would pay for a map-side op
    from torchvision.ops import roi_align

    return roi_align(images, rois_t, output_size=out_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-8)
    h = torch.where(maxc == r, (g - b) / d % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-image brightness/contrast/saturation factors and hue shifts on x in [0, 1]."""
    v = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    x = (x * v(b)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * v(c) + mean).clamp(0, 1)
    g = _gray(x)
    x = ((x - g) * v(s) + g).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + h.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def _extents(images: torch.Tensor, sizes: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    return sizes if sizes is not None else [(images.shape[-1], images.shape[-2])] * len(images)


def augmented_views(images: torch.Tensor, rngs: list[np.random.Generator], n_views: int,
                    scale: tuple[float, float] = (0.2, 1.0),
                    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                    p_jitter: float = 0.8, p_gray: float = 0.2, sizes: list[tuple[int, int]] | None = None,
                    out_size: int | None = None) -> torch.Tensor:
    """SimCLR-style augmentations (as EncoderMI uses), n views per image: (B·n)×3×S×S in [0, 1], image-major.

    ``images`` may be a padded canvas of originals: ``sizes`` gives each one's (width,
    height) in its top-left corner (default: the whole tensor); ``out_size`` is S (default:
    the tensor's side)."""
    size = out_size or images.shape[-1]
    boxes, params = [], []
    for rng, extent in zip(rngs, _extents(images, sizes)):
        boxes.append(random_resized_boxes(rng, n_views, extent, scale))
        bj, cj, sj, hj = jitter
        params.append(np.stack([
            rng.random(n_views) < 0.5,  # flip
            rng.random(n_views) < p_jitter,  # jitter on
            rng.uniform(1 - bj, 1 + bj, n_views), rng.uniform(1 - cj, 1 + cj, n_views),
            rng.uniform(1 - sj, 1 + sj, n_views), rng.uniform(-hj, hj, n_views),
            rng.random(n_views) < p_gray,  # grayscale
        ], 1).astype(np.float32))
    views = crop_resize(images, boxes, size)
    p = torch.from_numpy(np.concatenate(params)).to(views.device)
    flip = p[:, 0].bool().view(-1, 1, 1, 1)
    views = torch.where(flip, views.flip(-1), views)
    on = p[:, 1].bool()
    ones, zeros = torch.ones_like(p[:, 2]), torch.zeros_like(p[:, 2])
    views = color_jitter(views, torch.where(on, p[:, 2], ones), torch.where(on, p[:, 3], ones),
                         torch.where(on, p[:, 4], ones), torch.where(on, p[:, 5], zeros))
    gray = p[:, 6].bool().view(-1, 1, 1, 1)
    return torch.where(gray, _gray(views).expand_as(views), views)


def part_crops(images: torch.Tensor, rngs: list[np.random.Generator], n_crops: int,
               scale: tuple[float, float], sizes: list[tuple[int, int]] | None = None,
               out_size: int | None = None, centre_square: bool = False) -> torch.Tensor:
    """Small part crops, resized to model size: (B·k)×3×S×S, image-major (``sizes`` and
    ``out_size`` as in :func:`augmented_views`). ``centre_square``: cut them from each image's
    centred square of its shorter side — the region a resize-and-centre-crop model input (and
    so its patch tokens) shows — with ``scale`` a fraction of that square's area."""
    boxes = []
    for rng, (w, h) in zip(rngs, _extents(images, sizes)):
        if not centre_square:
            boxes.append(random_resized_boxes(rng, n_crops, (w, h), scale))
            continue
        side = min(w, h)
        b = random_resized_boxes(rng, n_crops, side, scale)
        boxes.append(b + np.array([(w - side) / 2, (h - side) / 2] * 2, dtype=np.float32))
    return crop_resize(images, boxes, out_size or images.shape[-1])


def patch_masks(rngs: list[np.random.Generator], ratios: list[float], grid: int, size: int,
                device: torch.device) -> torch.Tensor:
    """Random patch masks: (B·R)×1×S×S with 1 = keep, image-major then ratio."""
    cells = grid * grid
    masks = np.ones((len(rngs), len(ratios), cells), dtype=np.float32)
    for i, rng in enumerate(rngs):
        for j, r in enumerate(ratios):
            masks[i, j, rng.permutation(cells)[: round(r * cells)]] = 0.0
    m = torch.from_numpy(masks).to(device).view(-1, 1, grid, grid)
    return torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")
