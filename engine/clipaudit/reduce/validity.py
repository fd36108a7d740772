"""The validity check: a blind baseline that never looks at the model.

Many published membership results on CLIP-scale data are distribution-shift detection in
disguise: members and non-members come from different sources, and a classifier that sees
only the inputs tells them apart (Das et al., 2024, beat most attacks this way with
non-linear models on caption text). So the baseline averages a gradient-boosted tree model
(scikit-learn's ``HistGradientBoostingClassifier``, small leaves for small labelled sets) and
an L2 logistic regression, both on model-free image statistics and, where captions exist,
caption text features per image — TF-IDF of hashed words and word pairs (reduced to a few dozen
components), length, digits, and years; an identity's features are the mean over its images,
so the number of photos a person has is not itself a feature. Cross-fitted like the attacks
(folds by identity). When its AUC interval lies above :data:`SHIFT_FLOOR` at a level, the labelled
sets differ in a way the model plays no part in, and the attacks' numbers at that level
cannot be read as membership.
"""

from __future__ import annotations

import re

import numpy as np

#: the warning fires when the lower end of the baseline's AUC interval is above this
SHIFT_FLOOR = 0.55
#: copies of the inputs unrelated to the labels on which the baseline is cross-fitted again: where its
#: AUC lies when there is no shift, and its spread (reported beside it; the warning does not use them)
NULL_REPS = 5
#: at most this many identities (people) for those refits: their cost grows with the units, and a
#: cross-fitted AUC's chance spread shrinks as people grow
NULL_MAX_GROUPS = 1000
#: columns of the hashed word 1-2-grams (collisions between the terms of a capped sample are rare)
HASHED_FEATURES = 1 << 20
_YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")


def without_name(caption: str | None, identity: str | None) -> str:
    """The caption with the person's own name (and each part of it) replaced by ``person``.

    Folds are grouped by identity, so a name never generalises to held-out people; what it
    does carry is how often the name occurs (its document frequency), i.e. how many photos
    the person has — an artefact of how the candidate set was assembled, not of its sources.
    """
    text = caption or ""
    if identity:
        for part in sorted({identity, *identity.split()}, key=len, reverse=True):
            if len(part) >= 2:
                text = re.sub(rf"(?<!\w){re.escape(part)}(?!\w)", "person", text, flags=re.IGNORECASE)
    return text


def text_features(captions: list[str | None], identities: list[str | None] | None = None, components: int = 32,
                  seed: int = 0) -> np.ndarray | None:
    """Per unit: length in characters and words, digits, years mentioned, and a truncated SVD of
    TF-IDF word 1–2-grams (hashed; terms in at least two captions; fitted on these captions,
    without labels), each caption with its person's name masked (:func:`without_name`). None
    when no unit has text."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

    if identities is None:
        identities = [None] * len(captions)
    texts = [without_name(c, i) for c, i in zip(captions, identities)]
    if not any(texts):
        return None
    simple = np.array([[len(c), len(c.split()), sum(ch.isdigit() for ch in c), len(_YEAR.findall(c))]
                       for c in texts], dtype=float)
    # hashed word 1-2-grams (no vocabulary held: bounded memory however many captions), the
    # columns of terms in at least two captions, then TF-IDF weights fitted on these captions
    counts = HashingVectorizer(ngram_range=(1, 2), n_features=HASHED_FEATURES, alternate_sign=False,
                               norm=None).transform(texts).tocsc()
    counts = counts[:, np.flatnonzero(np.diff(counts.indptr) >= 2)]
    if not counts.shape[1]:  # no term occurs twice
        return simple
    tfidf = TfidfTransformer(sublinear_tf=True).fit_transform(counts)
    k = min(components, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
    # every unit with the same TF-IDF row (e.g. one caption template with the name masked): the
    # components would carry nothing (and their explained-variance ratio divides by zero)
    spread = float((tfidf.power(2).mean(axis=0) - np.square(tfidf.mean(axis=0))).sum())
    if k < 1 or spread <= 1e-12:
        return simple
    return np.hstack([simple, TruncatedSVD(n_components=k, random_state=seed).fit_transform(tfidf)])


def name_features(names: list[str], pool: list[str] | None = None) -> np.ndarray:
    """Per identity, what its name alone says: length in characters and words, the share of
    non-ASCII letters (script), and — against the name pool — how common its first and last
    names are (log of how many pool names share each). The identity-inference paper's non-members are other
    people than its members; names of another population (longer, another script, rarer first
    names) can separate the labelled sets without the model."""
    from collections import Counter

    pool = pool or names
    first = Counter(n.split()[0].lower() for n in pool if n.split())
    last = Counter(n.split()[-1].lower() for n in pool if n.split())
    rows = []
    for n in names:
        parts = n.split() or [""]
        letters = [c for c in n if c.isalpha()]
        rows.append([len(n), len(parts), sum(not c.isascii() for c in letters) / max(len(letters), 1),
                     np.log1p(first[parts[0].lower()]), np.log1p(last[parts[-1].lower()])])
    return np.array(rows, dtype=float).reshape(len(names), 5)


def _models(n: int, seed: int) -> list:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    trees = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.05, max_leaf_nodes=7,
                                           min_samples_leaf=max(2, min(20, n // 10)), l2_regularization=1.0,
                                           random_state=seed)
    linear = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    return [trees, linear]


def blind_scores(stats: np.ndarray, text: np.ndarray | None, y: np.ndarray, groups: np.ndarray,
                 refits: int, folds: int = 5, names: np.ndarray | None = None
                 ) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Out-of-fold member probabilities of the blind baseline (the mean of its two models),
    one vector per refit (fold assignments differ by refit), with each row's fold id (-1 where
    it has no features); None when the data cannot be cross-fitted. ``text``: per-unit
    caption features (:func:`text_features`) or None; ``names``: per-unit name features
    (:func:`name_features`, identity level) or None."""
    return _cross_fitted(_inputs(stats, text, names), y, groups, range(refits), folds)


def blind_null_scores(stats: np.ndarray, text: np.ndarray | None, y: np.ndarray, groups: np.ndarray,
                      reps: int, folds: int = 5, names: np.ndarray | None = None, seed: int = 0
                      ) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """:func:`blind_scores` (one fit each) on ``reps`` copies of the inputs that say nothing
    about the labels (:func:`unrelated_inputs`): where the baseline's cross-fitted AUC lies when
    there is no shift, and how far it strays by chance with this many people — the reading
    beside an AUC below 0.5 (a learner fitted on some people and scored on others can fall
    below chance when what the training people's members and non-members differ in by chance
    goes the other way among the held-out ones)."""
    X = _inputs(stats, text, names)
    rng = np.random.default_rng(seed)
    out: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for r in range(reps):  # one copy at a time: never reps copies of the inputs at once
        fitted = _cross_fitted(unrelated_inputs(X, groups, rng), y, groups, [seed + r], folds)
        if fitted is None:
            return None
        out[0].append(fitted[0][0])
        out[1].append(fitted[1][0])
    return out


def unrelated_inputs(X: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``X`` with every group's rows replaced by rows of another group (the groups permuted at
    random; a donor's rows drawn without replacement where it has enough, else with), in random
    order: photos of one person still resemble each other, and nothing says who is a member."""
    codes = np.unique(groups, return_inverse=True)[1]
    rows_of = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
    donor = rng.permutation(len(rows_of))
    out = np.empty_like(X)
    for g, rows in enumerate(rows_of):
        have = rows_of[donor[g]]
        out[rows] = X[rng.choice(have, len(rows), replace=len(have) < len(rows))]
    return out


def _inputs(stats: np.ndarray, text: np.ndarray | None, names: np.ndarray | None) -> np.ndarray:
    return np.hstack([stats] + [x for x in (text, names) if x is not None])


def _cross_fitted(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seeds, folds: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """The baseline's out-of-fold probabilities and fold ids, one pair per seed (folds and trees)."""
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    keep = ~np.all(np.isnan(X), axis=1)
    codes = np.unique(groups, return_inverse=True)[1]
    # a fold needs groups of both classes: as many folds as the rarer class has groups
    per_class = [len(np.unique(codes[keep & (y == c)])) for c in (True, False)]
    n_splits = min(folds, *per_class)
    if keep.sum() < 4 or n_splits < 2:
        return None
    out, fold_ids = [], []
    for r in seeds:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=r)
        splits = list(cv.split(X[keep], y[keep], codes[keep]))
        f = np.full(int(keep.sum()), -1)
        for i, (_, test) in enumerate(splits):
            f[test] = i
        p, ids = np.full(len(y), np.nan), np.full(len(y), -1)
        p[keep] = np.mean([cross_val_predict(m, X[keep], y[keep], groups=codes[keep], cv=splits,
                                             method="predict_proba")[:, 1] for m in _models(int(keep.sum()), r)], 0)
        ids[keep] = f
        out.append(p)
        fold_ids.append(ids)
    return out, fold_ids


def describe(with_text: bool, with_names: bool = False) -> str:
    return ("blind baseline: gradient-boosted trees + logistic regression (mean) on model-free image statistics "
            "(colour, saturation, brightness, edges, size)" + (" and caption text (TF-IDF words and word pairs, "
                                                               "length, digits, years)" if with_text else "")
            + (" and the names (length, words, script, how common the first and last names are in the pool)"
               if with_names else "") + ", cross-fitted by identity")


def rule() -> str:
    return (f"warning at a level when the lower end of the blind baseline's AUC interval is above {SHIFT_FLOOR}: "
            "the labelled members and non-members differ in their inputs alone, so attack scores at that level "
            "may measure that difference (distribution shift), not membership")
