"""The frozen-feature classifiers: a written-out k-NN vote, separable clusters are found,
features that carry no label stay at chance, bad shapes are refused."""
import numpy as np
import pytest

from taichu.probe import knn_accuracy, linear_probe


def clusters(n, classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.standard_normal((n, dim)), y


def test_knn_is_the_weighted_vote_of_the_nearest():
    # 1-D directions on the unit circle: the vote written out by hand for one query.
    angles = np.array([0.0, 0.1, 0.2, 2.0, 2.1])
    train_x = np.stack([np.cos(angles), np.sin(angles)], axis=1) * [[1], [2], [3], [1], [5]]
    train_y = np.array([0, 1, 1, 2, 2])
    query = np.array([[np.cos(0.05), np.sin(0.05)]])
    sims = np.cos(angles - 0.05)
    top = np.argsort(-sims)[:3]                       # rows 0, 1, 2
    w = np.exp(sims[top] / 0.07)
    expected = 0 if w[0] > w[1] + w[2] else 1
    assert knn_accuracy(train_x, train_y, query, [expected], k=3) == 1.0
    assert knn_accuracy(train_x, train_y, query, [1 - expected], k=3) == 0.0


def test_separable_clusters_are_found_and_noise_is_at_chance():
    train_x, train_y = clusters(400, 5, 16, 0.3, seed=0)
    rng = np.random.default_rng(1)
    test_x, test_y = clusters(200, 5, 16, 0.3, seed=0)  # same centres, other draws below
    test_x = test_x + 0.3 * rng.standard_normal(test_x.shape)
    assert knn_accuracy(train_x, train_y, test_x, test_y) > 0.95
    assert linear_probe(train_x, train_y, test_x, test_y) > 0.95
    noise_train, noise_test = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    labels_train, labels_test = rng.integers(0, 5, 400), rng.integers(0, 5, 400)
    # Chance is 0.2; 400 test rows: one standard deviation is 0.02.
    assert abs(knn_accuracy(noise_train, labels_train, noise_test, labels_test) - 0.2) < 0.08
    assert abs(linear_probe(noise_train, labels_train, noise_test, labels_test) - 0.2) < 0.08


def test_constant_features_do_not_break_the_probe():
    train_x, train_y = clusters(100, 3, 4, 0.1, seed=2)
    train_x = np.concatenate([train_x, np.ones((100, 1))], axis=1)
    assert linear_probe(train_x, train_y, train_x, train_y) > 0.95


def test_bad_inputs_are_refused():
    x, y = clusters(10, 2, 3, 0.1, seed=0)
    with pytest.raises(ValueError, match="one dim"):
        knn_accuracy(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(x, y[:5], x, y)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        knn_accuracy(bad, y, x, y)
