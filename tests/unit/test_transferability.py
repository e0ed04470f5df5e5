"""Transferability scores on synthetic data: informative features and agreeing source heads score higher,
the degenerate cases stay finite, and LogME's evidence matches a direct implementation of the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml import transferability as tr

FEATURE_METRICS = ("logme", "hscore")


def planted(
    seed: int, n: int = 300, d: int = 32, classes: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, their one-hot code in the first `classes` of d dimensions, and Gaussian noise: the tests
    use noise + signal * code as features, a signal planted linearly in a few dimensions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    code = np.zeros((n, d))
    code[np.arange(n), labels] = 1.0
    noise = rng.standard_normal((n, d))
    return labels, code, noise


def direct_log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The closed-form log evidence of Bayesian linear regression, computed naively."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    sign, log_det = np.linalg.slogdet(a)
    assert sign > 0
    return float(
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * np.sum((y - features @ m) ** 2)
        - alpha / 2 * np.sum(m**2)
        - log_det / 2
    )


def entropy_of(labels: np.ndarray) -> float:
    p = np.bincount(labels) / labels.shape[0]
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------- feature metrics


@pytest.mark.parametrize("metric", FEATURE_METRICS)
def test_informative_features_beat_noise(metric: str) -> None:
    labels, code, noise = planted(0)
    other_noise = np.random.default_rng(1).standard_normal(noise.shape)
    informative = tr.score(metric, noise + 1.5 * code, labels, None)
    uninformative = tr.score(metric, other_noise, labels, None)
    assert np.isfinite(informative) and np.isfinite(uninformative)
    assert informative > uninformative


@pytest.mark.parametrize("metric", FEATURE_METRICS)
def test_informative_features_beat_noise_when_d_exceeds_n(metric: str) -> None:
    # Paired: the same noise with and without the planted signal. (With d >> n the shrunk H-score is
    # dominated by chance class-mean differences over the many noise dimensions, so against independent
    # noise it is not a reliable ranking there, and a much stronger signal can even lower it.)
    labels, code, noise = planted(2, n=40, d=200, classes=3)
    assert tr.score(metric, noise + 3.0 * code, labels, None) > tr.score(metric, noise, labels, None)


@pytest.mark.parametrize("metric", FEATURE_METRICS)
def test_more_signal_scores_higher(metric: str) -> None:
    labels, code, noise = planted(4)
    scores = [tr.score(metric, noise + s * code, labels, None) for s in (0.5, 1.0, 2.0)]
    assert scores[0] < scores[1] < scores[2]


def test_logme_is_invariant_to_permuting_class_indices() -> None:
    labels, code, noise = planted(5)
    features = noise + code
    permuted = np.array([2, 0, 3, 1])[labels]
    assert tr.logme(features, permuted) == pytest.approx(tr.logme(features, labels), rel=1e-10)


def test_logme_is_nearly_invariant_to_feature_scale() -> None:
    # Scaling F by c is absorbed by alpha -> alpha c^2, so the maximised evidence does not move (up to the
    # fixed point's stopping tolerance).
    labels, code, noise = planted(6)
    features = noise + code
    assert tr.logme(100.0 * features, labels) == pytest.approx(tr.logme(features, labels), abs=1e-4)


@pytest.mark.parametrize(
    "case",
    ["constant_column", "all_constant", "all_zero", "duplicated_rows", "d_greater_than_n", "one_class"],
)
def test_logme_is_finite_on_degenerate_features(case: str) -> None:
    labels, code, noise = planted(7, n=60, d=10, classes=3)
    features = noise + code
    if case == "constant_column":
        features[:, 4] = 3.0
    elif case == "all_constant":
        features = np.full_like(features, 2.0)
    elif case == "all_zero":
        features = np.zeros_like(features)
    elif case == "duplicated_rows":
        features = np.vstack([features, features])
        labels = np.concatenate([labels, labels])
    elif case == "d_greater_than_n":
        labels, code, noise = planted(8, n=40, d=200, classes=3)
        features = noise + code
    else:
        labels = np.zeros_like(labels)
    assert np.isfinite(tr.logme(features, labels))


def test_logme_evidence_matches_the_direct_formula() -> None:
    labels, code, noise = planted(9, n=60, d=5, classes=3)
    features = noise + 0.8 * code
    for c in range(3):
        y = (labels == c).astype(np.float64)
        for alpha, beta in [(0.1, 0.5), (1.0, 1.0), (5.0, 10.0), (30.0, 2.0)]:
            assert tr._logme_evidence(features, y, alpha, beta) == pytest.approx(
                direct_log_evidence(features, y, alpha, beta), rel=1e-9
            )


def test_logme_maximises_the_evidence_per_class() -> None:
    labels, code, noise = planted(10, n=60, d=5, classes=3)
    features = noise + 0.8 * code
    evidence, alphas, betas = tr._logme_per_class(features, labels)
    assert tr.logme(features, labels) == pytest.approx(float(np.mean(evidence)) / 60, rel=1e-12)
    for c in range(3):
        y = (labels == c).astype(np.float64)
        assert evidence[c] == pytest.approx(direct_log_evidence(features, y, alphas[c], betas[c]), rel=1e-9)
        arbitrary = [(0.1, 0.5), (1.0, 1.0), (5.0, 10.0), (30.0, 2.0), (0.01, 100.0)]
        nearby = [(alphas[c] * fa, betas[c] * fb) for fa in (0.5, 2.0) for fb in (0.8, 1.25)]
        for alpha, beta in arbitrary + nearby:
            assert evidence[c] >= direct_log_evidence(features, y, alpha, beta) - 1e-9


def test_hscore_is_finite_with_collinear_features() -> None:
    labels, code, noise = planted(11, n=100, d=8, classes=3)
    features = noise + code
    collinear = np.hstack([features, features, 2.0 * features[:, :3]])
    value = tr.hscore(collinear, labels)
    assert np.isfinite(value) and value > 0
    other = np.random.default_rng(12).standard_normal(features.shape)
    assert value > tr.hscore(np.hstack([other, other, 2.0 * other[:, :3]]), labels)


def test_hscore_is_scale_invariant_and_near_its_bound_for_separable_classes() -> None:
    labels, code, noise = planted(13, n=2000, d=5, classes=3)
    features = 0.05 * noise + code
    value = tr.hscore(features, labels)
    assert tr.hscore(1e3 * features, labels) == pytest.approx(value, rel=1e-8)
    # Without shrinkage tr(cov^-1 cov(E[f|y])) <= C - 1; with plenty of data the shrinkage is tiny.
    assert 1.9 < value < 2.0 + 1e-3


def test_hscore_of_constant_features_is_zero() -> None:
    labels, _, _ = planted(14, n=50, d=4, classes=3)
    assert tr.hscore(np.ones((50, 4)), labels) == 0.0


# ------------------------------------------------------------------------------------------- head metrics


def test_leep_prefers_a_head_that_agrees_with_the_labels() -> None:
    rng = np.random.default_rng(15)
    n, source_classes = 400, 10
    labels = rng.integers(0, 4, n)
    agreeing_logits = rng.standard_normal((n, source_classes))
    agreeing_logits[np.arange(n), labels * 2] += 4.0  # target class c <-> source class 2c
    agreeing = tr.leep(softmax(agreeing_logits), labels)
    random = tr.leep(softmax(rng.standard_normal((n, source_classes))), labels)
    assert agreeing > random
    assert agreeing <= 0 and random <= 0


def test_leep_is_never_positive() -> None:
    rng = np.random.default_rng(16)
    for _ in range(20):
        n = int(rng.integers(2, 50))
        labels = rng.integers(0, int(rng.integers(1, 6)), n)
        probabilities = rng.dirichlet(np.full(int(rng.integers(1, 8)), 0.3), size=n)
        assert tr.leep(probabilities, labels) <= 0.0


def test_leep_exact_values() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    # A one-hot head that is a bijection of the labels predicts them perfectly.
    one_hot = np.eye(5)[np.array([3, 0, 4])[labels]]
    assert tr.leep(one_hot, labels) == pytest.approx(0.0, abs=1e-12)
    # An uninformative head leaves P(y | z) = P(y): LEEP is minus the label entropy.
    uniform = np.full((6, 5), 0.2)
    assert tr.leep(uniform, labels) == pytest.approx(-entropy_of(labels), rel=1e-12)


def test_nce_is_zero_for_a_bijection_and_negative_otherwise() -> None:
    rng = np.random.default_rng(17)
    labels = rng.integers(0, 5, 300)
    bijection = np.array([7, 2, 9, 0, 4])[labels]
    assert tr.nce(bijection, labels) == pytest.approx(0.0, abs=1e-9)
    # Many-to-one from source to target classes is also fine: Z still determines Y.
    refined = labels * 2 + rng.integers(0, 2, 300)
    assert tr.nce(refined, labels) == pytest.approx(0.0, abs=1e-9)
    assert tr.nce(rng.integers(0, 5, 300), labels) < -0.5
    assert tr.nce(np.zeros(300, dtype=np.int64), labels) == pytest.approx(-entropy_of(labels), rel=1e-12)


def test_nce_increases_with_agreement() -> None:
    rng = np.random.default_rng(18)
    labels = rng.integers(0, 5, 500)
    noise = rng.integers(0, 5, 500)
    draw = rng.random(500)
    scores = [tr.nce(np.where(draw < p, labels, noise), labels) for p in (0.3, 0.6, 0.9)]
    assert scores[0] < scores[1] < scores[2] < 0


# --------------------------------------------------------------------------------------------- dispatcher


def test_metric_names() -> None:
    assert tr.METRICS == ("logme", "hscore", "leep", "nce")
    assert tr.HEAD_METRICS == ("leep", "nce")


def test_score_dispatches_to_each_metric() -> None:
    labels, code, noise = planted(19, n=80, d=6, classes=3)
    features = noise + code
    probabilities = softmax(np.random.default_rng(20).standard_normal((80, 7)))
    assert tr.score("logme", features, labels, None) == tr.logme(features, labels)
    assert tr.score("hscore", features, labels, probabilities) == tr.hscore(features, labels)
    assert tr.score("leep", None, labels, probabilities) == tr.leep(probabilities, labels)
    assert tr.score("nce", features, labels, probabilities) == tr.nce(probabilities.argmax(axis=1), labels)


@pytest.mark.parametrize("metric", tr.HEAD_METRICS)
def test_head_metrics_need_probabilities(metric: str) -> None:
    labels, code, noise = planted(21, n=30, d=4, classes=2)
    with pytest.raises(ValueError, match="source_probabilities"):
        tr.score(metric, noise + code, labels, None)


@pytest.mark.parametrize("metric", FEATURE_METRICS)
def test_feature_metrics_need_features(metric: str) -> None:
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="features"):
        tr.score(metric, None, labels, np.full((4, 2), 0.5))


@pytest.mark.parametrize("metric", tr.METRICS)
def test_mismatched_lengths_are_rejected(metric: str) -> None:
    labels = np.array([0, 1, 2, 0, 1])
    features = np.random.default_rng(22).standard_normal((6, 3))
    probabilities = np.full((6, 3), 1 / 3)
    with pytest.raises(ValueError, match="6 rows but there are 5 labels"):
        tr.score(metric, features, labels, probabilities)


def test_bad_inputs_are_rejected() -> None:
    labels = np.array([0, 1, 1, 0])
    features = np.ones((4, 2))
    with pytest.raises(ValueError, match="unknown transferability metric"):
        tr.score("logmee", features, labels, None)
    with pytest.raises(ValueError, match="integer"):
        tr.logme(features, labels.astype(np.float64))
    with pytest.raises(ValueError, match="1-D"):
        tr.hscore(features, labels[:, None])
    with pytest.raises(ValueError, match="NaN"):
        tr.logme(np.array([[0.0, np.nan]] * 4), labels)
    with pytest.raises(ValueError, match="sum to 1"):
        tr.leep(np.array([[2.0, 1.0]] * 4), labels)
    with pytest.raises(ValueError, match="non-negative"):
        tr.leep(np.array([[1.5, -0.5]] * 4), labels)
    with pytest.raises(ValueError, match="integer"):
        tr.nce(np.full(4, 0.5), labels)
    with pytest.raises(ValueError, match="5 entries but there are 4 labels"):
        tr.nce(np.zeros(5, dtype=np.int64), labels)
