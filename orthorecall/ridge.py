"""A ridge classifier in closed form (numpy, float64), for linear decoding probes.

What the memory-decode probe (``experiments/probes/probe.py``) needs and no more: one-vs-all
least squares on standardized features with an unpenalized intercept, λ chosen on a
validation split from a small grid, training and held-out sets split by sequence (the
samples of one sequence share its memory, so splitting inside a sequence would let the
decoder see the test memories). sklearn is not a dependency; this is 40 lines of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# λ per sample-standardized feature: from almost none to strong shrinkage. The
# replication's grid (0.1, 1, 10, 100) is inside it.
LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@dataclasses.dataclass(frozen=True)
class RidgeClassifier:
    """A fitted classifier: predict argmax over ``classes`` of ((x − mean) / scale) W + b."""

    classes: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    ridge: float

    def predict(self, features) -> np.ndarray:
        x = (np.asarray(features, np.float64) - self.mean) / self.scale
        return self.classes[np.argmax(x @ self.weights + self.bias, axis=1)]

    def accuracy(self, features, labels) -> float:
        return float(np.mean(self.predict(features) == np.asarray(labels)))


def fit(features, labels, ridge: float) -> RidgeClassifier:
    """Ridge regression of one-hot labels on standardized features, intercept unpenalized.

    Args:
        features: (n, f) real.
        labels: (n,) integer class labels.
        ridge: λ > 0, added to the standardized features' Gram matrix.
    """
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(
            f"features (n, f) and labels (n,) with n > 0; got {x.shape}, {labels.shape}."
        )
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}.")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature carries nothing
    x = (x - mean) / scale
    classes, index = np.unique(labels, return_inverse=True)
    targets = np.eye(len(classes))[index]
    bias = targets.mean(axis=0)
    gram = x.T @ x + ridge * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, x.T @ (targets - bias))
    return RidgeClassifier(classes, mean, scale, weights, bias, float(ridge))


@dataclasses.dataclass(frozen=True)
class Decoded:
    """Held-out accuracy of a decoder, its λ and the sample counts."""

    accuracy: float
    ridge: float
    num_train: int
    num_test: int


def _split(groups, fraction: float, what: str):
    """Boolean masks (first, rest): the first ``fraction`` of the sorted groups, the rest."""
    unique = np.unique(groups)
    count = round(fraction * len(unique))
    if not 0 < count < len(unique):
        raise ValueError(
            f"{what}: {len(unique)} sequences cannot be split {fraction:.0%} / "
            f"{1 - fraction:.0%} with at least one on each side; use more sequences."
        )
    first = np.isin(groups, unique[:count])
    return first, ~first


def decode(
    features,
    labels,
    groups,
    *,
    train_fraction: float = 0.7,
    validation_fraction: float = 0.2,
    lambdas=LAMBDAS,
) -> Decoded:
    """Fits a ridge decoder on the first sequences and scores it on the others.

    The first ``train_fraction`` of the sequences (``groups``, sorted) train; of those,
    the last ``validation_fraction`` choose λ from ``lambdas`` (the best validation
    accuracy; of equals, the largest λ); the decoder is then refitted on all training
    sequences with that λ and scored on the held-out ones.

    Args:
        features: (n, f); labels: (n,) classes; groups: (n,) sequence ids.

    Returns:
        ``Decoded``. A held-out label never seen in training counts as wrong.

    Raises:
        ValueError: too few sequences to split, or mismatched shapes.
    """
    features = np.asarray(features, np.float64)
    labels, groups = np.asarray(labels), np.asarray(groups)
    if not (features.ndim == 2 and labels.shape == groups.shape == (features.shape[0],)):
        raise ValueError(
            f"features (n, f), labels (n,) and groups (n,); got {features.shape}, "
            f"{labels.shape}, {groups.shape}."
        )
    train, test = _split(groups, train_fraction, "train/test")
    fitting, validation = _split(groups[train], 1 - validation_fraction, "fit/validation")
    scores = [
        fit(features[train][fitting], labels[train][fitting], lam).accuracy(
            features[train][validation], labels[train][validation]
        )
        for lam in lambdas
    ]
    best = max(lam for lam, score in zip(lambdas, scores, strict=True) if score == max(scores))
    decoder = fit(features[train], labels[train], best)
    return Decoded(
        accuracy=decoder.accuracy(features[test], labels[test]),
        ridge=best,
        num_train=int(train.sum()),
        num_test=int(test.sum()),
    )
