"""The attack registry: each attack declares itself once, in its own module, as an
:class:`Attack` passed to :func:`register`.

Everything else — the job spec, the output schemas, the map step, the reduce step, the
report and the benchmark — iterates over :func:`registered` and never names an attack.
An attack's name is the same everywhere: spec key, module name, column prefix and
``metrics.json`` key.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from clipaudit.core.errors import ClipauditError

Level = Literal["identity", "image"]


@dataclass(frozen=True)
class Column:
    """An output column with its documentation (the schemas/*.json entry)."""

    name: str
    type: pa.DataType
    doc: str
    nullable: bool = True

    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable)


@dataclass(frozen=True)
class Score:
    """A membership score (higher = more member-like) and the level it is computed at.

    ``image``: a per-sample column ``<name>_score`` in ``samples/`` (averaged per identity
    into ``identities.parquet``); ``identity``: a column ``<name>_score`` of the attack's
    per-identity SQL (see :attr:`Attack.identity_sql`).
    """

    name: str
    level: Level
    identity_doc: str = ""  # doc of the per-identity mean (image-level scores)
    #: the identities column its identity-level metrics use (default ``<name>_score``; nan = left out)
    metric_column: str | None = None

    @property
    def metric(self) -> str:
        return self.metric_column or f"{self.name}_score"


def _as_is(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True)
class Learned:
    """A learned attacker on an attack's feature vector, cross-fitted in the reduce step.

    ``name`` is its key under the attack in ``metrics.json``; ``prepare`` turns the feature
    matrix (rows may hold nan) into the attacker's input.
    """

    name: str
    label: str  # short label in the report table
    what: str  # what the attacker is, in words
    prepare: Callable[[np.ndarray], np.ndarray] = _as_is
    model: Literal["logistic", "mlp"] = "logistic"  # the attacker fitted on the prepared features


@dataclass
class IdentityAnalysis:
    """What an attack's own reduce-side analysis adds: identities columns (identity → value)
    and entries merged into its ``metrics.json`` object."""

    columns: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    #: per column: identity → the per-draw values its entry averages (e.g. an identity-level score on each draw of
    #: k images); the evaluation computes metrics per draw from them and averages
    draws: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisInput:
    """What :attr:`Attack.analyse` gets: DuckDB with the ``ok`` view, the attack's parameters,
    the job seed, and the identity labels (None without a labels file)."""

    con: Any
    params: Any
    seed: int
    labels: dict[str, bool] | None
    #: identities the attack leaves out of its figures (e.g. names missing from the name pool)
    excluded: frozenset[str] = frozenset()


#: the plain learned attacker: logistic regression on the raw feature vector
LOGISTIC = Learned("learned", "learned", "learned (cross-fitted logistic on the feature vector, 5 folds by identity)")


@dataclass(frozen=True)
class Attack:
    """Everything the engine needs to know about one attack."""

    name: str
    title: str  # display name
    params: type[BaseModel]  # the spec model of ``attacks.<name>`` (parameters, defaults, validation)
    #: (params, job spec) → the map-side implementation (an ``attacks.base.MapAttack``; typed Any
    #: because the registry sits below the spec and the attacks, which import it)
    build: Callable[[Any, Any], Any]
    columns: tuple[Column, ...]  # what the map step adds to ``samples/``
    scores: tuple[Score, ...]
    default: bool = False  # on when a job spec has no ``attacks`` key
    reduce_only: frozenset[str] = frozenset()  # parameters that never change map outputs
    features: str | None = None  # column of the raw feature vector the learned variants use
    learned: tuple[Learned, ...] = ()
    #: per-identity columns computed by ``identity_sql`` (identity-level attacks)
    identity_columns: tuple[Column, ...] = ()
    #: (relation of ok rows, params) → SQL with one row per identity: ``identity`` + those of
    #: identity_columns that ``analyse`` does not provide
    identity_sql: Callable[[str, Any], str] | None = None
    #: bump when the map values change meaning without a schema change: older outputs are not resumed
    features_version: int = 1
    #: the attack's own reduce-side analysis (e.g. a sweep over the number of images per identity)
    analyse: Callable[[AnalysisInput], IdentityAnalysis] | None = None
    #: its map side cuts views from the decoded original (``MapBatch.sources``), not the model input
    source_views: bool = False
    #: its score shares no input with the view-consistency attacks (e.g. an image–caption cosine):
    #: weakly supervised attackers take their pseudo-members from such a score first
    independent_signal: bool = False
    #: its columns' place in the published schemas among the built-ins (lower first); plugins
    #: without one follow in registration order
    position: float = float("inf")
    #: params → the forward passes of the vision tower its map side adds per scored image (views,
    #: crops, masked copies, a reference model's pass); None: none (it uses the image's embedding)
    image_passes: Callable[[Any], int] | None = None

    def map_fingerprint(self, params: BaseModel) -> dict[str, Any]:
        """The parameters that change what the map step writes (an unset ``sample``, scoring every
        image, is left out: the hash of a job that samples nothing stays what it was before)."""
        out = params.model_dump(mode="json", exclude=set(self.reduce_only))
        if out.get("sample", True) is None:
            del out["sample"]
        return out

    def image_scores(self) -> list[Score]:
        return [s for s in self.scores if s.level == "image"]


class RegistryError(ClipauditError, ValueError):
    """An attack declaration that cannot be registered."""


_REGISTRY: dict[str, Attack] = {}
_BUILTIN: set[str] = set()
_PLUGIN_ATTACKS: dict[str, tuple[str, ...]] = {}  # plugin reference → the attacks it registered
_VERSION = [0]  # bumped on every registration (cached spec models and schemas are rebuilt)


#: names the engine itself uses beside the attacks' (metrics keys, feature keys)
RESERVED = frozenset({"baseline", "baseline_text", "distribution_shift_warning", "shift_rule", "identity", "status"})


def _all_columns(a: Attack) -> set[str]:
    """Every column an attack's registration puts in any output table (its own and derived)."""
    out = {c.name for c in a.columns + a.identity_columns}
    for s in a.scores:
        out |= {f"{s.name}_score", f"{s.name}_pvalue", f"{s.name}_flag"}
    for v in a.learned if a.features else ():
        out |= {f"{a.name}_{v.name}_{x}" for x in ("score", "pvalue", "flag")}
    return out


def register(attack: Attack) -> Attack:
    """Add an attack; its name and every column it owns must be new."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", attack.name):
        raise RegistryError(f"attack name {attack.name!r}: use lower-case letters, digits and _")
    old = _REGISTRY.get(attack.name)
    if old is not None:
        if old == attack:
            return old  # the same declaration imported twice
        raise RegistryError(f"an attack named {attack.name!r} is already registered")
    if attack.name in RESERVED:
        raise RegistryError(f"attack name {attack.name!r} is reserved (used by the engine's own outputs)")
    owned = {c for a in _REGISTRY.values() for c in _all_columns(a)}
    for c in attack.columns + attack.identity_columns:
        if not c.name.startswith(attack.name + "_"):
            raise RegistryError(f"attack {attack.name!r}: column {c.name!r} must start with {attack.name + '_'!r}")
    clash = sorted(_all_columns(attack) & owned)
    if clash:
        raise RegistryError(f"attack {attack.name!r}: column {clash[0]!r} is already owned by another attack")
    for s in attack.scores:
        if not s.name.startswith(attack.name):
            raise RegistryError(f"attack {attack.name!r}: score {s.name!r} must start with {attack.name!r}")
    _REGISTRY[attack.name] = attack
    _VERSION[0] += 1
    return attack


#: the entry-point group attack modules are found by: the built-in package (``clipaudit.attacks``,
#: which imports each of its modules) and any installed package that adds attacks to every job
ENTRY_POINTS = "clipaudit.attacks"
BUILTIN_PACKAGE = "clipaudit.attacks"


def _load_builtin() -> None:
    """Import the attack modules named by the :data:`ENTRY_POINTS` group (each registers its
    attacks on import) — by name, as entry points are: the registry sits below the attacks and
    never imports them statically. The built-in package is imported even where the package's
    metadata is missing (a source tree on ``PYTHONPATH``)."""
    if _BUILTIN:
        return
    from importlib.metadata import entry_points

    targets = [BUILTIN_PACKAGE] + [ep.value for ep in entry_points(group=ENTRY_POINTS) if ep.value != BUILTIN_PACKAGE]
    for target in targets:
        importlib.import_module(target)
    _BUILTIN.update(_REGISTRY)


def registered() -> list[Attack]:
    """Every attack registered in this process: the built-ins in their fixed order (that of
    their columns in the published schemas, :attr:`Attack.position`), then the others in
    registration order."""
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda a: a.position)


def builtin_names() -> set[str]:
    _load_builtin()
    return set(_BUILTIN)


def available(plugins: tuple[str, ...] | list[str] = ()) -> list[Attack]:
    """The attacks a job may use: the built-ins plus those registered by its own plugins (a
    plugin that another job loaded into this process does not leak into this one)."""
    _load_builtin()
    names = set(_BUILTIN).union(*(_PLUGIN_ATTACKS.get(_plugin_key(p), ()) for p in plugins))
    return [a for a in registered() if a.name in names]


def registry_version() -> int:
    _load_builtin()
    return _VERSION[0]


def get(name: str) -> Attack:
    for a in registered():
        if a.name == name:
            return a
    raise KeyError(f"unknown attack {name!r}; registered: {', '.join(a.name for a in registered())}")


def scores(enabled: list[str] | tuple[str, ...], level: Level | None = None) -> list[Score]:
    """The scores of the enabled attacks (registry order), optionally of one level."""
    out = []
    for a in registered():
        if a.name in enabled:
            out += [s for s in a.scores if level is None or s.level == level]
    return out


def _plugin_key(ref: str) -> str:
    return str(Path(ref).resolve()) if ref.endswith(".py") else ref


def load_plugin(ref: str) -> str:
    """Import an attack plugin — a ``.py`` file or an importable module name — which registers
    its attack(s) on import (once per process). Returns the path of its source file."""
    _load_builtin()
    key = _plugin_key(ref)
    before = set(_REGISTRY)
    if ref.endswith(".py"):
        path = Path(key)
        if not path.is_file():
            raise RegistryError(f"file not found: {ref}")
        name = "clipaudit_plugin_" + hashlib.sha1(key.encode()).hexdigest()[:12]
        if name not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        source = str(path)
    else:
        try:
            module = importlib.import_module(ref)
        except ImportError as e:
            raise RegistryError(f"cannot import plugin module {ref!r}: {e}") from None
        source = str(getattr(module, "__file__", None) or ref)
    added = tuple(n for n in _REGISTRY if n not in before)
    if key not in _PLUGIN_ATTACKS or added:
        _PLUGIN_ATTACKS[key] = _PLUGIN_ATTACKS.get(key, ()) + added
    if not _PLUGIN_ATTACKS[key]:
        raise RegistryError(f"plugin {ref} registered no attack (call clipaudit.contract.registry.register)")
    return source
