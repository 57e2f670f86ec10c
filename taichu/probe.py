"""How good frozen features are for classification: a linear probe and DINO's weighted k-NN.

Both take features already computed (numpy, one row per image) and labels, so any encoder of
any backend can be measured the same way (``taichu probe``; the vision family's claims).

- ``linear_probe``: multinomial logistic regression (scikit-learn's lbfgs, L2 penalty ``C``)
  on features standardised with the training set's mean and deviation.
- ``knn_accuracy``: DINO's k-NN classifier (Caron et al. 2021, §4.1 / eval_knn.py): cosine
  similarity of L2-normalised features, the ``k`` nearest training images vote for their
  label with weight ``exp(similarity / temperature)``; defaults k = 20, temperature 0.07.
"""
from __future__ import annotations

import numpy as np


def _check(train_x, train_y, test_x, test_y):
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y).astype(np.int64), np.asarray(test_y).astype(np.int64)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [n, dim] with one dim, got {train_x.shape} and {test_x.shape}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"{len(train_x)} / {len(test_x)} feature rows but {len(train_y)} / {len(test_y)} labels")
    if not (np.isfinite(train_x).all() and np.isfinite(test_x).all()):
        raise ValueError("features hold NaN or infinity")
    return train_x, train_y, test_x, test_y


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07) -> float:
    """Share of test rows whose weighted vote of the ``k`` nearest train rows is right."""
    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)
    k = min(k, len(train_x))
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    similarity = unit(test_x) @ unit(train_x).T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    classes = int(max(train_y.max(), test_y.max())) + 1
    votes = np.zeros((len(test_x), classes))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[nearest]), weights)
    return float((votes.argmax(axis=1) == test_y).mean())


def linear_probe(train_x, train_y, test_x, test_y, C: float = 1.0, max_iter: int = 2000) -> float:
    """Test accuracy of a logistic regression trained on the standardised train features."""
    from sklearn.linear_model import LogisticRegression

    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)   # a constant feature stays 0, not NaN
    model = LogisticRegression(C=C, max_iter=max_iter)
    model.fit((train_x - mean) / std, train_y)
    return float((model.predict((test_x - mean) / std) == test_y).mean())
