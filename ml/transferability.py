"""Transferability estimates: how well a pretrained model will transfer to a labelled target dataset,
scored without fine-tuning.

Two kinds of metric:

* feature metrics (LogME, H-score) take the frozen backbone's features of the target examples;
* head metrics (LEEP, NCE) take the outputs of the model's *source* classification head on the target
  examples, and so only apply to models that come with one.

Every score is "higher is better" and is only meant to rank candidate models on the same target dataset:
the absolute values of different metrics are not comparable with each other.

Pure numpy, computed in float64. Labels are integer class indices 0..C-1, one per example.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

METRICS: tuple[str, ...] = ("logme", "hscore", "leep", "nce")
HEAD_METRICS: tuple[str, ...] = ("leep", "nce")

_LOGME_MAX_ITERATIONS = 100
_LOGME_TOLERANCE = 1e-3
# alpha and beta are kept inside this range, so the evidence stays finite when the fixed point runs off to
# a boundary (a target that the features fit exactly, an all-zero feature matrix).
_LOGME_MIN = 1e-12
_LOGME_MAX = 1e12
_LOG_2PI = math.log(2.0 * math.pi)

Array = NDArray[np.float64]


# --------------------------------------------------------------------------------------------- validation


def _check_labels(labels: np.ndarray) -> NDArray[np.int64]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.shape[0] < 2:
        raise ValueError(f"need at least 2 labelled examples, got {labels.shape[0]}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("labels must be non-negative class indices 0..C-1")
    return labels.astype(np.int64)


def _check_features(features: np.ndarray, n: int) -> Array:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (examples x dimensions), got shape {features.shape}")
    if features.shape[0] != n:
        raise ValueError(f"features have {features.shape[0]} rows but there are {n} labels")
    if features.shape[1] < 1:
        raise ValueError("features must have at least one dimension")
    out = features.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError("features contain NaN or infinite values")
    return out


def _check_probabilities(probabilities: np.ndarray, n: int) -> Array:
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2:
        raise ValueError(
            f"source_probabilities must be a 2-D array (examples x source classes), got shape {probabilities.shape}"
        )
    if probabilities.shape[0] != n:
        raise ValueError(f"source_probabilities have {probabilities.shape[0]} rows but there are {n} labels")
    out = probabilities.astype(np.float64)
    if not np.all(np.isfinite(out)) or np.any(out < 0):
        raise ValueError(
            "source_probabilities must be finite and non-negative (pass softmax outputs, not logits)"
        )
    if not np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("each row of source_probabilities must sum to 1 (pass softmax outputs, not logits)")
    return out


def _check_predictions(predictions: np.ndarray, n: int) -> NDArray[np.int64]:
    predictions = np.asarray(predictions)
    if predictions.ndim != 1:
        raise ValueError(
            f"source_predictions must be a 1-D array of class indices, got shape {predictions.shape}"
        )
    if predictions.shape[0] != n:
        raise ValueError(f"source_predictions have {predictions.shape[0]} entries but there are {n} labels")
    if predictions.dtype == np.bool_ or not np.issubdtype(predictions.dtype, np.integer):
        raise ValueError(f"source_predictions must be integer class indices, got dtype {predictions.dtype}")
    if predictions.size and predictions.min() < 0:
        raise ValueError("source_predictions must be non-negative class indices")
    return predictions.astype(np.int64)


# ------------------------------------------------------------------------------------------------- LogME


def _logme_evidence_spectral(
    sigma: Array, z2: Array, residual_out: Array, n: int, d: int, alpha: Array, beta: Array
) -> Array:
    """Log evidence of Bayesian linear regression in the eigenbasis of F^T F, for several targets at once.

    sigma: (k,) the non-zero-or-not eigenvalues s_i^2 of F^T F that come from the thin SVD (k = min(n, d));
    z2: (k, T) squared projections (U^T y)^2 of each target; residual_out: (T,) the part of ||y||^2
    outside the span of U; alpha, beta: (T,).
    """
    denom = alpha[None, :] + beta[None, :] * sigma[:, None]  # (k, T): eigenvalues of A
    m2 = np.sum(beta[None, :] ** 2 * sigma[:, None] * z2 / denom**2, axis=0)  # ||m||^2
    residual = np.sum(alpha[None, :] ** 2 * z2 / denom**2, axis=0) + residual_out  # ||y - F m||^2
    log_det_a = np.sum(np.log(denom), axis=0) + (d - sigma.shape[0]) * np.log(alpha)
    return (
        0.5 * n * np.log(beta)
        + 0.5 * d * np.log(alpha)
        - 0.5 * n * _LOG_2PI
        - 0.5 * beta * residual
        - 0.5 * alpha * m2
        - 0.5 * log_det_a
    )


def _logme_spectrum(features: Array, targets: Array) -> tuple[Array, Array, Array]:
    """The thin SVD of F reduced to what LogME needs: eigenvalues of F^T F, squared projections of the
    targets on the left singular vectors, and the squared norm of each target outside their span."""
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    projections = u.T @ targets  # (k, T)
    z2 = projections**2
    residual_out = np.maximum(np.sum(targets**2, axis=0) - np.sum(z2, axis=0), 0.0)
    return s**2, z2, residual_out


def _logme_evidence(features: np.ndarray, target_column: np.ndarray, alpha: float, beta: float) -> float:
    """Log evidence log p(y | F, alpha, beta) of Bayesian linear regression y = F w + noise with prior
    w ~ N(0, alpha^-1 I) and noise precision beta (not divided by n). For tests and diagnostics."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target_column, dtype=np.float64).reshape(-1, 1)
    sigma, z2, residual_out = _logme_spectrum(f, y)
    value = _logme_evidence_spectral(
        sigma, z2, residual_out, f.shape[0], f.shape[1], np.array([float(alpha)]), np.array([float(beta)])
    )
    return float(value[0])


def _logme_per_class(features: Array, labels: NDArray[np.int64]) -> tuple[Array, Array, Array]:
    """Maximised log evidence per class present in `labels` (not divided by n), with the alpha and beta
    that reach it."""
    n, d = features.shape
    classes = np.unique(labels)
    targets = (labels[:, None] == classes[None, :]).astype(np.float64)  # one-hot, (n, T)
    sigma, z2, residual_out = _logme_spectrum(features, targets)
    t = targets.shape[1]
    alpha = np.ones(t)
    beta = np.ones(t)
    active = np.ones(t, dtype=bool)
    tiny = np.finfo(np.float64).tiny
    for _ in range(_LOGME_MAX_ITERATIONS):
        a, b = alpha[active], beta[active]
        zz, out = z2[:, active], residual_out[active]
        denom = a[None, :] + b[None, :] * sigma[:, None]
        gamma = np.sum(b[None, :] * sigma[:, None] / denom, axis=0)  # effective number of parameters
        m2 = np.sum(b[None, :] ** 2 * sigma[:, None] * zz / denom**2, axis=0)
        residual = np.sum(a[None, :] ** 2 * zz / denom**2, axis=0) + out
        new_a = np.clip(gamma / np.maximum(m2, tiny), _LOGME_MIN, _LOGME_MAX)
        new_b = np.clip(np.maximum(n - gamma, 0.0) / np.maximum(residual, tiny), _LOGME_MIN, _LOGME_MAX)
        ratio_old, ratio_new = a / b, new_a / new_b
        converged = np.abs(ratio_new - ratio_old) / ratio_old < _LOGME_TOLERANCE
        idx = np.flatnonzero(active)
        alpha[idx], beta[idx] = new_a, new_b
        active[idx[converged]] = False
        if not active.any():
            break
    evidence = _logme_evidence_spectral(sigma, z2, residual_out, n, d, alpha, beta)
    return evidence, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME, the log of maximum evidence (You et al., "LogME: Practical Assessment of Pre-trained Models
    for Transfer Learning", ICML 2021). Higher is better.

    For each class c, a Bayesian linear regression of the one-hot target y_c on the features, with prior
    w ~ N(0, alpha^-1 I) and noise precision beta; its marginal evidence p(y_c | F, alpha, beta) is
    maximised over alpha and beta by the paper's fixed-point iteration (gamma = sum beta s_i / (alpha +
    beta s_i), alpha = gamma / ||m||^2, beta = (n - gamma) / ||y - F m||^2), in the SVD basis of F. The
    score is the mean over the classes present of the maximised log evidence divided by n. The features
    are used as given (not centred), as in the paper.
    """
    y = _check_labels(labels)
    f = _check_features(features, y.shape[0])
    evidence, _, _ = _logme_per_class(f, y)
    return float(np.mean(evidence) / f.shape[0])


# ------------------------------------------------------------------------------------------------ H-score


def _shrunk_covariance(centred: Array) -> Array:
    """Ledoit-Wolf shrinkage of the sample covariance towards a scaled identity (Ledoit & Wolf, "A
    well-conditioned estimator for large-dimensional covariance matrices", 2004)."""
    n, d = centred.shape
    sample = centred.T @ centred / n
    mu = float(np.trace(sample)) / d
    target_gap = sample.copy()
    target_gap[np.diag_indices(d)] -= mu
    delta = float(np.sum(target_gap**2)) / d
    if delta <= 0.0:
        return sample
    norms4 = float(np.sum(np.sum(centred**2, axis=1) ** 2))
    spread = (norms4 - n * float(np.sum(sample**2))) / (n**2 * d)
    shrinkage = min(max(spread, 0.0), delta) / delta
    shrunk = (1.0 - shrinkage) * sample
    shrunk[np.diag_indices(d)] += shrinkage * mu
    return shrunk


def hscore(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score (Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
    Learning", ICIP 2019). Higher is better.

    H(f) = tr(cov(f)^-1 cov(E[f | y])): how much of the features' variance lies between the class means.
    The features are centred, cov(f) is the Ledoit-Wolf shrunk covariance and its inverse is a
    pseudo-inverse, so the score stays finite when d > n or the features are collinear (shrinkage lowers
    the score a little compared with the plain inverse). Bounded by the number of classes minus one when
    the covariance is not shrunk. When d >> n it is dominated by chance differences between the class
    means over the many dimensions, and ranks models less reliably than LogME.
    """
    y = _check_labels(labels)
    f = _check_features(features, y.shape[0])
    centred = f - f.mean(axis=0, keepdims=True)
    covariance = _shrunk_covariance(centred)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    sums = np.zeros((classes.shape[0], f.shape[1]))
    np.add.at(sums, inverse, centred)
    means = sums / counts[:, None].astype(np.float64)
    # cov(E[f|y]) = sum_c p(c) mu_c mu_c^T; the overall mean is zero after centring.
    between = (means * (counts[:, None] / y.shape[0])).T @ means
    precision = np.linalg.pinv(covariance, rcond=1e-10, hermitian=True)
    return float(np.sum(precision * between))


# --------------------------------------------------------------------------------------------------- LEEP


def leep(source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    """LEEP, the log expected empirical prediction (Nguyen et al., "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations", ICML 2020). Higher is better; always <= 0.

    Rows of `source_probabilities` are the source head's softmax theta_i over its Z source classes. With
    the empirical joint P(y, z) = 1/n sum_{i: y_i = y} theta_i(z) and the conditional P(y | z), the score
    is 1/n sum_i log sum_z P(y_i | z) theta_i(z).
    """
    y = _check_labels(labels)
    theta = _check_probabilities(source_probabilities, y.shape[0])
    n = y.shape[0]
    theta = theta / theta.sum(axis=1, keepdims=True)
    n_classes = int(y.max()) + 1
    joint = np.zeros((n_classes, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= n
    marginal = joint.sum(axis=0, keepdims=True)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    expected = np.sum(conditional[y] * theta, axis=1)  # sum_z P(y_i | z) theta_i(z), in (0, 1]
    return float(np.mean(np.log(np.clip(expected, np.finfo(np.float64).tiny, 1.0))))


# ---------------------------------------------------------------------------------------------------- NCE


def nce(source_predictions: np.ndarray, labels: np.ndarray) -> float:
    """NCE, negative conditional entropy (Tran et al., "Transferability and Hardness of Supervised
    Classification Tasks", ICCV 2019). Higher is better; always <= 0, and 0 when the source predictions
    determine the target labels.

    -H(Y | Z) = sum_{y, z} P(y, z) log P(y | z), with Z the source head's hard predictions (integer source
    class indices) and the probabilities the empirical ones.
    """
    y = _check_labels(labels)
    z = _check_predictions(source_predictions, y.shape[0])
    n = y.shape[0]
    joint = np.zeros((int(y.max()) + 1, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0)
    marginal = joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    conditional = np.divide(joint, marginal, out=np.ones_like(joint), where=nonzero)
    return float(np.sum(joint[nonzero] * np.log(conditional[nonzero])) / n)


# --------------------------------------------------------------------------------------------- dispatcher


def score(
    metric: str,
    features: np.ndarray | None,
    labels: np.ndarray,
    source_probabilities: np.ndarray | None,
) -> float:
    """The transferability score `metric` (one of METRICS; higher is better) of a model on a labelled
    target dataset. Feature metrics need `features`; head metrics (HEAD_METRICS) need the source head's
    softmax outputs `source_probabilities` (NCE uses their argmax as the hard predictions)."""
    if metric not in METRICS:
        raise ValueError(f"unknown transferability metric {metric!r}; expected one of {', '.join(METRICS)}")
    if metric in HEAD_METRICS:
        if source_probabilities is None:
            raise ValueError(
                f"metric {metric!r} needs the source head's probabilities (source_probabilities), "
                "which this model does not provide"
            )
        if metric == "leep":
            return leep(source_probabilities, labels)
        y = _check_labels(labels)
        probabilities = _check_probabilities(source_probabilities, y.shape[0])
        return nce(np.argmax(probabilities, axis=1), y)
    if features is None:
        raise ValueError(f"metric {metric!r} needs the backbone's features of the target examples")
    if metric == "logme":
        return logme(features, labels)
    return hscore(features, labels)
