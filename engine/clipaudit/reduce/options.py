"""The reduce step's settings (:class:`ReduceOptions`), as the job spec or the CLI give them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from clipaudit.contract.registry import get, registered
from clipaudit.reduce.tables import REDUCE_MEMORY


@dataclass(frozen=True)
class ReduceOptions:
    """What the reduce step needs: the enabled attacks with their parameters (names alone
    mean default parameters), labels, controls, the target FPR and the name pool."""

    #: the registry's default attacks (those on when a job spec has no ``attacks`` key) unless given
    attacks: Mapping[str, Any] | tuple[str, ...] = field(default_factory=lambda: tuple(a.name for a in registered()
                                                                                      if a.default))
    labels: Path | str | None = None  # a local file or a URL
    controls: Path | str | None = None  # a local file or a URL
    target_fpr: float = 0.01
    fdr: float = 0.1  # calibration.fdr: discoveries are candidates with a BH q-value at most this
    names: Path | str | None = None  # a local file or a URL
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # the job's data.storage_options (URLs)
    seed: int = 0  # the job seed: random draws of the reduce step derive from it
    attackers: Path | None = None  # another audit's folder: apply its fitted attackers instead of fitting here
    near_duplicates: bool = False  # find copies inside the candidates; they do not vote (see neighbours.py)
    reference: Path | None = None  # a FAISS index to look every candidate up in
    copies: Path | None = None  # set by reduce_outputs: the near_duplicates.parquet the identity level skips
    memory_limit: str = REDUCE_MEMORY  # DuckDB's; it spills to OUT/_tmp beyond it

    def __post_init__(self) -> None:
        given = dict.fromkeys(self.attacks) if not isinstance(self.attacks, Mapping) else dict(self.attacks)
        params: dict[str, BaseModel] = {}
        for name, p in given.items():
            model = get(name).params
            params[name] = p if isinstance(p, model) else model.model_validate(p or {})
        object.__setattr__(self, "attacks", params)

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(self.attacks)

    def params(self, name: str) -> Any:
        return self.attacks[name]  # type: ignore[index]
