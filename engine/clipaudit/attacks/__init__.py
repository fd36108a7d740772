"""Membership attacks: a registry (:mod:`.registry`) and one module per attack, each declaring
its spec parameters, map-side features, output columns, scores and learned variants once.

Names are the same everywhere: spec key, module, column prefix and metrics key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MapAttack
from .registry import registered

if TYPE_CHECKING:
    from ..spec import JobSpec


def build_attacks(spec: JobSpec) -> list[MapAttack]:
    """The map-side implementations of the attacks a spec enables (registry order), plus the
    model-free statistics of the validity check."""
    from .baseline import BaselineFeatures

    out = [a.build(getattr(spec.attacks, a.name), spec) for a in registered()
           if getattr(spec.attacks, a.name, None) is not None]
    return out + [BaselineFeatures()]
