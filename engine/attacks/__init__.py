"""Membership attacks: one module per attack (map-side features + reduce-side scoring).

Names are the same everywhere: spec key, module, column prefix and metrics key.
"""

from __future__ import annotations

from ..spec import JobSpec
from .base import MapAttack
from .baseline import BaselineFeatures
from .caption import CaptionAttack
from .encodermi import EncoderMIAttack
from .idia import IdiaAttack, load_name_pool, resolve_templates
from .mim import MimAttack
from .partcrop import PartCropAttack

ATTACK_NAMES = ("idia", "encodermi", "partcrop", "mim", "caption")


def build_attacks(spec: JobSpec) -> list[MapAttack]:
    """The map-side attacks a spec enables, in a fixed order."""
    attacks: list[MapAttack] = []
    if spec.attacks.idia is not None:
        cfg = spec.attacks.idia
        attacks.append(IdiaAttack(load_name_pool(spec.names), resolve_templates(cfg.templates), cfg.top_k))
    a = spec.attacks
    if a.encodermi is not None:
        attacks.append(EncoderMIAttack(a.encodermi.views, a.encodermi.scale))
    if a.partcrop is not None:
        attacks.append(PartCropAttack(a.partcrop.crops, a.partcrop.scale))
    if a.mim is not None:
        attacks.append(MimAttack(a.mim.mask_ratios))
    if a.caption is not None:
        attacks.append(CaptionAttack(a.caption.reference_model, spec.compute.device, spec.seed))
    attacks.append(BaselineFeatures())  # model-free statistics for the validity check
    return attacks
