"""Membership attacks: one module per attack, each declaring its spec parameters, map-side
features, output columns, scores and learned variants once, in :mod:`clipaudit.contract.registry`.

Importing this package imports every module in it, so each attack registers itself: adding an
attack is adding its module. Names are the same everywhere: spec key, module, column prefix and
metrics key.
"""

from __future__ import annotations

import importlib
import pkgutil

from clipaudit.attacks.base import MapAttack
from clipaudit.contract.registry import registered
from clipaudit.spec import JobSpec
from clipaudit.attacks.baseline import BaselineFeatures

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_attacks(spec: JobSpec) -> list[MapAttack]:
    """The map-side implementations of the attacks a spec enables (registry order), plus the
    model-free statistics of the validity check."""
    out = [a.build(getattr(spec.attacks, a.name), spec) for a in registered()
           if getattr(spec.attacks, a.name, None) is not None]
    return out + [BaselineFeatures()]
