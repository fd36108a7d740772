"""The blind baseline's caption features: no name, no photo count, but the caption's source."""

import numpy as np
import pytest

from clipaudit.reduce.validity import text_features, without_name


def test_the_persons_own_name_is_masked():
    assert without_name("Ivo Dilez with friends; ivo again", "Ivo Dilez") == "person with friends; person again"
    assert without_name("Ivona at a park", "Ivo Dilez") == "Ivona at a park"  # whole words only
    assert without_name(None, "Ann Lee") == "" and without_name("a b", None) == "a b"


def test_how_often_a_name_occurs_does_not_become_a_feature():
    """Two people with the same caption style, one with 12 photos and one with 3: their
    captions' features are the same once the names are masked (TF-IDF would otherwise weigh
    the rarer name higher — a photo count, not a source)."""
    caps = ["Ann Lee at a park"] * 12 + ["Bo Kim at a park"] * 3 + ["archive photo of Cy Doe, 1998"] * 4
    who = ["Ann Lee"] * 12 + ["Bo Kim"] * 3 + ["Cy Doe"] * 4
    f = text_features(caps, who, components=4)
    assert np.allclose(f[0], f[12]) and not np.allclose(f[0], f[15])
    unmasked = text_features(caps, None, components=4)
    assert not np.allclose(unmasked[0], unmasked[12])  # the artefact the masking removes
    assert f[15, 3] == 1  # one year mentioned


def test_captions_that_differ_only_in_the_masked_name_give_no_warning_and_no_components():
    """One caption template per person: after masking the name every TF-IDF row is the same, so the
    components would carry nothing (scikit-learn's SVD divided by a zero variance and warned)."""
    import warnings

    names = ["Ann Lee", "Bob Ray", "Cy Moe"]
    captions = [f"a photo of {n}" for n in names for _ in range(3)]
    identities = [n for n in names for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning fails the test
        X = text_features(captions, identities)
    assert X.shape == (9, 4)  # length, words, digits, years only
    varied = text_features([c + (" at the beach" if i % 2 else " in town") for i, c in enumerate(captions)],
                           identities)
    assert varied.shape[1] > 4  # where captions differ, the TF-IDF components are kept


def test_name_features_see_length_script_and_how_common_a_name_is():
    from clipaudit.reduce.validity import name_features

    pool = ["Anna Berg", "Anna Holm", "Anna Lind", "Jörg Ångström", "Li Wei"]
    f = name_features(["Anna Berg", "Jörg Ångström", "Li Wei"], pool)
    assert f.shape == (3, 5)
    assert f[:, 0].tolist() == [9, 13, 6] and f[:, 1].tolist() == [2, 2, 2]
    assert f[0, 2] == 0 and f[1, 2] == pytest.approx(3 / 12)  # ö, Å, ö among 12 letters
    assert f[0, 3] == pytest.approx(np.log1p(3)) and f[2, 3] == pytest.approx(np.log1p(1))  # "Anna" × 3


def test_the_blind_baseline_tells_two_name_populations_apart_from_the_names_alone():
    from clipaudit.core.statistics import membership_metrics
    from clipaudit.reduce.validity import blind_scores, name_features

    rng = np.random.default_rng(0)
    members = [f"Anna {s}" for s in ("Berg", "Holm", "Lind", "Dahl", "Ek", "Falk", "Gran", "Hed", "Sund", "Wik",
                                     "Nord", "Strand", "Alm", "Lund", "Ros", "Sjö")]
    others = [f"Ξένια Παπαδοπουλου{i}" for i in range(16)]
    names = members + others
    y = np.array([True] * 16 + [False] * 16)
    stats = rng.normal(size=(32, 6))  # the images say nothing
    groups = np.arange(32)
    alone, folds = blind_scores(stats, None, y, groups, refits=1)
    named, nfolds = blind_scores(stats, None, y, groups, refits=1, names=name_features(names))
    assert membership_metrics(alone[0], y, folds=folds)["auc_ci"][0] < 0.55
    assert membership_metrics(named[0], y, folds=nfolds)["auc_ci"][0] > 0.55


def test_unrelated_inputs_give_each_person_another_persons_photos_whole():
    """The null copies of the baseline's inputs: people permuted, each one's rows drawn from one
    other person's (without replacement where that person has enough), so photos of one person
    still resemble each other and nothing links them to a label."""
    from clipaudit.reduce.validity import unrelated_inputs

    groups = np.repeat(np.arange(6), [4, 4, 2, 2, 6, 3])
    X = np.column_stack([groups * 100 + np.arange(len(groups)), np.zeros(len(groups))]).astype(float)
    moved = set()
    for seed in range(5):
        out = unrelated_inputs(X, groups, np.random.default_rng(seed))
        donors = []
        for g in range(6):
            rows = out[groups == g, 0]
            donor = {int(v // 100) for v in rows}
            assert len(donor) == 1, rows  # one other person's photos, whole
            d = donor.pop()
            donors.append(d)
            if (groups == d).sum() >= (groups == g).sum():
                assert len(set(rows)) == len(rows)  # drawn without replacement where there are enough
            assert set(rows) <= set(X[groups == d, 0])
        assert sorted(donors) == list(range(6))  # a permutation of the people
        moved |= {g for g, d in enumerate(donors) if d != g}
    assert moved == set(range(6))


def test_the_baseline_with_unrelated_inputs_loses_a_real_difference():
    """Name populations the baseline tells apart (AUC interval above 0.55): refitted on copies of
    its inputs unrelated to the labels, it lies near 0.5, well below what it found."""
    from clipaudit.core.statistics import membership_metrics
    from clipaudit.reduce.validity import blind_null_scores, blind_scores, name_features

    rng = np.random.default_rng(1)
    names = [f"Anna {chr(65 + i)}berg" for i in range(20)] + [f"Ξένια Παπαδοπουλου{i}" for i in range(20)]
    y = np.array([True] * 20 + [False] * 20)
    stats, groups, feats = rng.normal(size=(40, 4)), np.arange(40), name_features(names)
    fit, folds = blind_scores(stats, None, y, groups, refits=1, names=feats)
    assert membership_metrics(fit[0], y, folds=folds)["auc_ci"][0] > 0.55
    null, null_folds = blind_null_scores(stats, None, y, groups, reps=8, names=feats)
    aucs = [membership_metrics(s, y, n_boot=0, folds=[f])["auc"] for s, f in zip(null, null_folds)]
    assert len(aucs) == 8 and abs(np.mean(aucs) - 0.5) < 0.1, aucs
