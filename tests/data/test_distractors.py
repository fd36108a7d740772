"""The generated name pool: every true name, distinct realistic distractors that never equal a
true name after normalisation, the asked size, reproducible from its seed."""

from collections import Counter

import pytest

pytest.importorskip("faker", reason="the ingest extra is not installed: pip install 'clipaudit[ingest]'")

from clipaudit.data.distractors import (  # noqa: E402
    FALLBACK_LOCALES, NamePoolBuildError, _draw, available_locales, build_name_pool, locale_names,
)
from clipaudit.data.samples import normalize_name  # noqa: E402


def first_draws(locale: str, n: int, seed: int) -> list[str]:
    """The first ``n`` names the pool builder would draw for ``locale`` with ``seed``."""
    return _draw(locale_names(locale), n, seed, set())


@pytest.mark.parametrize("transform", [str, str.upper, lambda n: f"  {n.replace(' ', '   ')} "])
def test_distractors_never_equal_a_true_name_even_when_the_generator_draws_it(transform):
    true = [transform(n) for n in first_draws("en_US", 150, seed=3)]  # exactly what en_US draws first
    pool = build_name_pool(true, 600, seed=3)
    assert pool.by_locale.get("en_US", 0) > 0  # the identities' own locale was drawn from
    assert len(pool.names) == 600 == len(set(pool.names)) and pool.n_true == 150
    normalised = [normalize_name(n) for n in true]
    assert set(normalised) <= set(pool.names)
    folded = {n.casefold() for n in normalised}
    distractors = [n for n in pool.names if n not in set(normalised)]
    assert len(distractors) == 450
    assert not [d for d in distractors if normalize_name(d).casefold() in folded]


def test_the_pool_is_reproducible_from_its_seed():
    true = ["Ann Lee", "Bo Chen", "Carla Díaz"]
    a, b = build_name_pool(true, 200, seed=1), build_name_pool(true, 200, seed=1)
    assert a.names == b.names
    assert build_name_pool(true, 200, seed=2).names != a.names


def test_distractors_follow_the_locales_of_the_true_names():
    true = first_draws("ja_JP", 20, seed=9) + first_draws("de_DE", 20, seed=9)
    pool = build_name_pool(true, 400, seed=0)
    top = [loc for loc, _ in Counter(pool.by_locale).most_common(2)]
    assert set(top) == {"ja_JP", "de_DE"}, pool.by_locale
    assert sum(pool.by_locale.values()) == 360


def test_names_that_match_no_locale_get_the_fallback_locales():
    pool = build_name_pool(["Person 0", "Person 1"], 2 + 10 * len(FALLBACK_LOCALES), seed=0)
    assert pool.by_locale == {loc: 10 for loc in FALLBACK_LOCALES if loc in available_locales()}
    for name in pool.names[:50]:
        assert name == normalize_name(name) and "{" not in name


def test_a_pool_smaller_than_the_true_names_is_refused():
    with pytest.raises(NamePoolBuildError, match="--pool-size 2 is smaller than the number of identities \\(3\\)"):
        build_name_pool(["A B", "C D", "E F"], 2)
    assert build_name_pool(["A B", "C D"], 2).names.__len__() == 2  # only the true names, no distractors
