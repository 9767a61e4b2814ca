"""Importance metrics against independent computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ifjax
from ifjax._tree import tree_get


def _setup(fixture):
    model, variables, x = fixture
    groups = ifjax.discover_groups(model, variables, x)
    return model, ifjax.fold_batchnorm(variables, groups), x, groups


def _np(variables, path):
    return np.asarray(tree_get(variables, path), np.float64)


def test_l1_and_l2_by_hand(tiny_vgg):
    _, folded, _, groups = _setup(tiny_vgg)
    group = groups[1]  # conv1 (writer, out axis 3) read by conv2 (in axis 2)
    w = _np(folded, ("params", "conv1", "kernel"))
    r = _np(folded, ("params", "conv2", "kernel"))
    for p, name in ((1, "l1"), (2, "l2")):
        expected = (np.abs(w) ** p).sum((0, 1, 2)) + (np.abs(r) ** p).sum((0, 1, 3))
        expected = expected / 2
        expected /= expected.mean()
        got = ifjax.group_importance(folded, group, name)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_l1_skips_dense_reading_a_flattened_map(tiny_vgg):
    _, folded, _, groups = _setup(tiny_vgg)
    group = groups[0]  # conv2 -> flatten of 2x2 positions -> classifier
    assert group.readers[0].outer == 4
    w = _np(folded, ("params", "conv2", "kernel"))
    expected = np.abs(w).sum((0, 1, 2))
    np.testing.assert_allclose(
        ifjax.group_importance(folded, group, "l1"), expected / expected.mean(), rtol=1e-5
    )


def test_lamp_correct_and_released():
    scores = jnp.array([3.0, 1.0, 4.0, 2.0])
    # sorted descending 4, 3, 2, 1; cumulative 4, 7, 9, 10
    correct = {2: 1.0, 0: 3 / 7, 3: 2 / 9, 1: 1 / 10}
    np.testing.assert_allclose(
        ifjax.lamp_transform(scores), [correct[i] for i in range(4)], rtol=1e-6
    )
    transformed_sorted = np.array([1.0, 3 / 7, 2 / 9, 1 / 10])
    order = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(
        ifjax.lamp_transform(scores, released=True), transformed_sorted[order], rtol=1e-6
    )


def test_lamp_uses_l2_norms_and_batchnorm_scale(tiny_vgg):
    _, folded, _, groups = _setup(tiny_vgg)
    group = groups[1]
    w = _np(folded, ("params", "conv1", "kernel"))
    r = _np(folded, ("params", "conv2", "kernel"))
    norms = [np.sqrt((w**2).sum((0, 1, 2))), np.sqrt((r**2).sum((0, 1, 3))), np.ones(16)]
    mean = np.mean(norms, axis=0)
    mean /= mean.mean()
    expected = ifjax.lamp_transform(jnp.asarray(mean, jnp.float32))
    np.testing.assert_allclose(ifjax.group_importance(folded, group, "lamp"), expected, rtol=1e-5)


def test_taylor_against_independent_gradients(tiny_vgg):
    model, folded, x, groups = _setup(tiny_vgg)
    rng = np.random.default_rng(0)
    batches = [(x, jnp.asarray(rng.integers(0, 10, len(x)))) for _ in range(3)]
    gradients = ifjax.accumulate_gradients(model, folded, batches)

    # independent: finite differences of the summed loss w.r.t. a few conv1 weights
    def total_loss(kernel):
        params = {**folded["params"], "conv1": {**folded["params"]["conv1"], "kernel": kernel}}
        variables = {**folded, "params": params}
        return sum(
            optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, xb), yb).mean()
            for xb, yb in batches
        )

    kernel = folded["params"]["conv1"]["kernel"]
    analytic = jax.grad(total_loss)(kernel)
    np.testing.assert_allclose(
        gradients["params"]["conv1"]["kernel"], analytic, rtol=1e-4, atol=1e-6
    )
    k64 = np.asarray(kernel, np.float64)
    h = 1e-3  # float32 central differences through ReLU/max-pool kinks: a loose check
    for index in [(1, 1, 0, 3), (0, 2, 5, 7)]:
        plus, minus = k64.copy(), k64.copy()
        plus[index] += h
        minus[index] -= h
        numeric = (total_loss(jnp.asarray(plus)) - total_loss(jnp.asarray(minus))) / (2 * h)
        np.testing.assert_allclose(analytic[index], numeric, rtol=0.1, atol=1e-4)

    group = groups[1]
    g_w = np.asarray(gradients["params"]["conv1"]["kernel"])
    g_r = np.asarray(gradients["params"]["conv2"]["kernel"])
    w = _np(folded, ("params", "conv1", "kernel"))
    r = _np(folded, ("params", "conv2", "kernel"))
    expected = (np.abs(w * g_w).sum((0, 1, 2)) + np.abs(r * g_r).sum((0, 1, 3))) / 2
    got = ifjax.group_importance(folded, group, "taylor", gradients=gradients)
    np.testing.assert_allclose(got, expected / expected.mean(), rtol=1e-4)


def test_random_importance_is_deterministic_given_key(tiny_vgg):
    _, folded, _, groups = _setup(tiny_vgg)
    a = ifjax.group_importance(folded, groups[1], "random", key=jax.random.key(1))
    b = ifjax.group_importance(folded, groups[1], "random", key=jax.random.key(1))
    c = ifjax.group_importance(folded, groups[1], "random", key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_importance_errors(tiny_vgg):
    _, folded, _, groups = _setup(tiny_vgg)
    with pytest.raises(ValueError, match="gradients"):
        ifjax.group_importance(folded, groups[1], "taylor")
    with pytest.raises(ValueError, match="unknown importance"):
        ifjax.group_importance(folded, groups[1], "l3")
    with pytest.raises(ValueError, match="unknown importance"):
        ifjax.intra_fusion(0.5, "chip")


def _lamp_from_definition(scores: np.ndarray) -> np.ndarray:
    """LAMP of every channel: its score over the sum of the scores not below it."""
    return np.array([s / scores[scores >= s].sum() for s in scores])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lamp_by_hand_on_unfolded_variables(tiny_vgg, index):
    """LAMP from its definition (REFERENCE.md section 3) in numpy, on the variables as
    trained (BatchNorm not folded: random gamma): per layer the L2 norm of every channel's
    slice and the BatchNorm's |gamma|, averaged, divided by their mean, then LAMP."""
    model, variables, x = tiny_vgg
    groups = ifjax.discover_groups(model, variables, x)
    writer, reader = {0: ("conv2", "classifier"), 1: ("conv1", "conv2"), 2: ("conv0", "conv1")}[
        index
    ]
    w = _np(variables, ("params", writer, "kernel"))
    r = _np(variables, ("params", reader, "kernel"))
    n = w.shape[-1]
    gamma = _np(variables, ("params", "bn" + writer[-1], "scale"))
    assert gamma.std() > 0.1  # random, not the folded ones
    if reader == "classifier":  # reads the flattened 2x2 map: rows (position, channel)
        r = r.reshape(-1, n, r.shape[-1]).transpose(1, 0, 2).reshape(n, -1)
    else:
        r = np.moveaxis(r, 2, 0).reshape(n, -1)
    vectors = [
        np.linalg.norm(np.moveaxis(w, 3, 0).reshape(n, -1), axis=1),
        np.linalg.norm(r, axis=1),
        np.abs(gamma),
    ]
    mean = np.mean(vectors, axis=0)
    expected = _lamp_from_definition(mean / mean.mean())
    got = np.asarray(ifjax.group_importance(variables, groups[index], "lamp"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.argmax(got) == np.argmax(mean)  # the largest channel scores 1
    np.testing.assert_allclose(got.max(), 1.0, rtol=1e-6)


def test_paper_scoring_scores_lamp_as_the_released_code():
    assert ifjax.paper_scoring("lamp") == "lamp_released"
    assert [ifjax.paper_scoring(name) for name in ("l1", "taylor", "l2")] == ["l1", "taylor", "l2"]
    assert ifjax.PAPER_IMPORTANCES["lamp"] == "lamp_released"
    assert (ifjax.TAYLOR_BATCHES, ifjax.TAYLOR_BATCH_SIZE) == (5, 128)
    with pytest.raises(ValueError, match="unknown importance 'l3'"):
        ifjax.paper_scoring("l3")
