"""Model-free image statistics for the validity check (not an attack).

If these alone separate members from non-members about as well as an attack does, the
"membership" signal is most likely a difference between the two image sources
(distribution shift), not memorisation. Features per image: mean and std of R, G, B,
mean saturation, mean brightness, edge energy, log width, log height, log aspect ratio.
"""

from __future__ import annotations

import math

import torch

from clipaudit.attacks.base import MapBatch, StatelessAttack
from clipaudit.attacks.views import rows

FEATURE_NAMES = ["mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "saturation", "brightness",
                 "edges", "log_width", "log_height", "log_aspect"]


def image_statistics(x: torch.Tensor) -> torch.Tensor:
    """x B×3×S×S in [0, 1] → B×9 pixel statistics."""
    mean = x.mean(dim=(2, 3))
    std = x.std(dim=(2, 3), unbiased=False)
    mx, mn = x.max(1).values, x.min(1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx)).mean(dim=(1, 2))
    gray = x.mean(1)
    edges = ((gray[:, 1:, :] - gray[:, :-1, :]).abs().mean(dim=(1, 2))
             + (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean(dim=(1, 2)))
    return torch.cat([mean, std, sat[:, None], gray.mean(dim=(1, 2))[:, None], edges[:, None]], 1)


class BaselineFeatures(StatelessAttack):
    """Computes ``baseline_features`` for every ok sample (not an attack: not registered)."""

    name = "baseline"

    def compute(self, batch: MapBatch) -> dict[str, list]:
        px = rows(image_statistics(batch.images))
        out = []
        for s, f in zip(batch.samples, px):
            w, h = max(s.width or 1, 1), max(s.height or 1, 1)
            out.append(f + [round(math.log(w), 5), round(math.log(h), 5), round(math.log(w / h), 5)])
        return {"baseline_features": out}
