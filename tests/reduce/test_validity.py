"""The blind baseline's caption features: no name, no photo count, but the caption's source."""

import numpy as np

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
