"""Membership attacks: one module per attack (map-side features + reduce-side scoring).

Names are the same everywhere: spec key, module, column prefix and metrics key.
"""

from __future__ import annotations

from ..spec import JobSpec
from .base import MapAttack
from .caption import CaptionAttack
from .idia import IdiaAttack, load_name_pool, resolve_templates

ATTACK_NAMES = ("idia", "caption")


def build_attacks(spec: JobSpec) -> list[MapAttack]:
    """The map-side attacks a spec enables, in a fixed order."""
    attacks: list[MapAttack] = []
    if spec.attacks.idia is not None:
        cfg = spec.attacks.idia
        attacks.append(IdiaAttack(load_name_pool(spec.names), resolve_templates(cfg.templates), cfg.top_k))
    if spec.attacks.caption is not None:
        attacks.append(CaptionAttack())
    return attacks
