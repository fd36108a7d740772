"""A candidate name pool: the true names plus generated distractors.

Distractors are realistic first + last names from Faker's person providers, drawn in the
locales the true names look like they come from (a locale whose lists hold a name's first
and last token), the rest from a fixed set of common locales. Everything is seeded, and no
distractor equals a true name after :func:`~clipaudit.data.samples.normalize_name` (nor
differs from one in case only).
"""

from __future__ import annotations

import importlib
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

from clipaudit.core.errors import ClipauditError
from clipaudit.data.samples import normalize_name

#: where distractors come from when the true names give no hint
FALLBACK_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "nl_NL", "pl_PL", "sv_SE",
                    "tr_TR", "hi_IN", "ja_JP", "zh_CN", "ko_KR")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class NamePoolBuildError(ClipauditError, ValueError):
    """The pool cannot be built as asked (too small for the identities, names exhausted)."""


@dataclass(frozen=True)
class LocaleNames:
    """A Faker locale's name formats with one first and one last name, and its name lists."""

    locale: str
    formats: tuple[str, ...]
    first: frozenset[str]
    last: frozenset[str]


@dataclass
class NamePool:
    """The pool (shuffled), how many true names it holds and the distractors per locale."""

    names: list[str]
    n_true: int
    by_locale: dict[str, int] = field(default_factory=dict)


def _first_last(fmt: str) -> bool:
    """A format made of exactly one first-name and one last-name placeholder (no titles)."""
    kinds = _PLACEHOLDER.findall(fmt)
    if len(kinds) != 2 or _PLACEHOLDER.sub("", fmt).strip():
        return False
    firsts = [k for k in kinds if k.startswith("first_name") and "abbreviated" not in k]
    lasts = [k for k in kinds if k == "last_name" or k.startswith("last_name_")]
    return len(firsts) == 1 and len(lasts) == 1


def _strings(provider: type, attrs: tuple[str, ...]) -> frozenset[str]:
    out: set[str] = set()
    for attr in attrs:
        values = getattr(provider, attr, None) or ()
        out.update(v for v in values if isinstance(v, str))
    return frozenset(out)


def locale_names(locale: str) -> LocaleNames | None:
    """What Faker's person provider of ``locale`` offers, or None when it has no first + last format."""
    try:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
    except (ImportError, AttributeError):
        return None
    formats = tuple(dict.fromkeys(f for f in (getattr(provider, "formats", None) or ()) if _first_last(f)))
    if not formats:
        return None
    first = _strings(provider, ("first_names", "first_names_male", "first_names_female", "first_names_nonbinary"))
    last = _strings(provider, ("last_names", "last_names_male", "last_names_female", "last_names_nonbinary"))
    return LocaleNames(locale, formats, first, last)


def available_locales() -> dict[str, LocaleNames]:
    """Every Faker locale whose person provider has a first + last name format."""
    from faker.config import AVAILABLE_LOCALES

    found = {loc: locale_names(loc) for loc in sorted(AVAILABLE_LOCALES)}
    return {loc: ln for loc, ln in found.items() if ln is not None}


def infer_locale_weights(identities: list[str], table: dict[str, LocaleNames]) -> Counter:
    """Per locale, how many identities look like its names (an identity matching k locales
    adds 1/k to each); identities matching none are spread over the fallback locales."""
    weights: Counter = Counter()
    unmatched = 0
    for name in identities:
        tokens = name.split()
        hits = []
        if len(tokens) >= 2:
            a, b = tokens[0], tokens[-1]
            hits = [loc for loc, ln in table.items()
                    if (a in ln.first and b in ln.last) or (b in ln.first and a in ln.last)]
        for loc in hits:
            weights[loc] += 1 / len(hits)
        unmatched += not hits
    fallback = [loc for loc in FALLBACK_LOCALES if loc in table]
    for loc in fallback:
        weights[loc] += unmatched / len(fallback)
    return weights


def _quotas(weights: Counter, total: int) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (largest remainder; ties by locale name)."""
    mass = sum(weights.values())
    if total <= 0 or mass <= 0:
        return {}
    exact = {loc: total * w / mass for loc, w in sorted(weights.items())}
    quotas = {loc: int(x) for loc, x in exact.items()}
    by_remainder = sorted(exact, key=lambda loc: (-(exact[loc] - quotas[loc]), loc))
    for loc in by_remainder[: total - sum(quotas.values())]:
        quotas[loc] += 1
    return {loc: q for loc, q in quotas.items() if q}


def _draw(ln: LocaleNames, n: int, seed: int, taken: set[str]) -> list[str]:
    """Up to ``n`` new names of one locale (fewer when its lists run out of combinations; none
    from a deprecated locale)."""
    from faker import Faker

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fake = Faker(ln.locale)
    if any("deprecated" in str(w.message) for w in caught):  # an alias (fr_QC of fr_CA): its names come twice
        return []
    fake.seed_instance(f"{seed}:{ln.locale}")
    pick = random.Random(f"{seed}:{ln.locale}:formats")
    out: list[str] = []
    misses = 0
    while len(out) < n and misses < 200 + 20 * n:
        name = normalize_name(fake.parse(pick.choice(ln.formats)))
        if not name or name.casefold() in taken:
            misses += 1
            continue
        taken.add(name.casefold())
        out.append(name)
    return out


def build_name_pool(identities: list[str], size: int, seed: int = 0) -> NamePool:
    """``size`` names: every identity (normalised) plus distractors, shuffled with ``seed``."""
    true = list(dict.fromkeys(n for n in (normalize_name(i) for i in identities) if n))
    if size < len(true):
        raise NamePoolBuildError(f"--pool-size {size} is smaller than the number of identities ({len(true)}); "
                                 "the pool holds every true name")
    taken = {n.casefold() for n in true}
    names, by_locale = list(true), Counter()
    need = size - len(true)
    if need:
        table = available_locales()
        plan = _quotas(infer_locale_weights(true, table), need)
        for loc, quota in plan.items():
            drawn = _draw(table[loc], quota, seed, taken)
            names += drawn
            by_locale[loc] += len(drawn)
        # locales whose lists ran out: top up from the fallback locales, then any other
        for loc in [*(x for x in FALLBACK_LOCALES if x in table), *table]:
            if len(names) >= size:
                break
            drawn = _draw(table[loc], size - len(names), seed + 1 + len(names), taken)
            names += drawn
            by_locale[loc] += len(drawn)
        if len(names) < size:
            raise NamePoolBuildError(f"could only generate {len(names) - len(true)} distinct distractor names "
                                     f"of the {need} asked for; use a smaller --pool-size")
    random.Random(seed).shuffle(names)
    return NamePool(names=names, n_true=len(true), by_locale=dict(sorted(by_locale.items())))
