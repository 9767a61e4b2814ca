"""OTFusion: permuted copies are recovered exactly; fused weights are averages of aligned ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import ifjax
from ifjax._fusion import _activation_cost, align, average_variables, fuse
from ifjax._tree import tree_get, tree_replace
from models import VGG, resnet18
from tests.tree_asserts import assert_trees_equal

SAMPLES = 24


def random_variables(model, x, seed=0):
    """Random weights and BatchNorm statistics, drawn with numpy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(path, leaf):
        name, shape = str(path[-1].key), leaf.shape
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
        low, high = {"var": (0.5, 2.0), "scale": (0.5, 1.5)}.get(name, (-0.2, 0.2))
        return rng.uniform(low, high, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny_vgg():
    model = VGG(cfg=(8, "M", 16, "M", 16, "M"), num_classes=10)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
    return model, random_variables(model, x), x


@pytest.fixture(scope="module")
def tiny_resnet():
    model = resnet18(widths=(4, 8, 8, 8))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 3)), jnp.float32)
    return model, random_variables(model, x), x


def _inputs(shape, seed=5):
    return np.random.default_rng(seed).normal(size=(SAMPLES,) + shape[1:]).astype(np.float32)


def _permute(variables, groups, seed):
    """The same network with every group's channels shuffled (slices taken by hand)."""
    rng = np.random.default_rng(seed)
    updates, perms = {}, {}
    get = lambda path: np.asarray(updates.get(path, tree_get(variables, path)))
    for g in groups:
        perm = perms[g.index] = rng.permutation(g.size)
        for w in g.writers:
            updates[w.kernel] = np.take(get(w.kernel), perm, w.axis)
        for r in g.readers:
            kernel = np.moveaxis(get(r.kernel), r.axis, 0)
            rest = kernel.shape[1:]
            kernel = kernel.reshape((r.outer, g.size, r.inner) + rest)[:, perm]
            updates[r.kernel] = np.moveaxis(kernel.reshape((-1,) + rest), 0, r.axis)
        for path, axis in g.channel_params:
            updates[path] = np.take(get(path), perm, axis)
    return tree_replace(variables, updates), perms


@pytest.mark.parametrize("method", ["activation", "weight"])
@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_resnet"])
def test_fusing_a_permuted_copy_recovers_the_model(method, name, request):
    model, variables, x = request.getfixturevalue(name)
    groups = ifjax.discover_groups(model, variables, x)
    permuted, perms = _permute(variables, groups, seed=1)
    inputs = _inputs(x.shape)
    # the permuted copy is the same function with different weights
    np.testing.assert_allclose(model.apply(permuted, x), model.apply(variables, x), atol=1e-5)
    assert not np.allclose(
        tree_get(permuted, groups[0].writers[0].kernel),
        tree_get(variables, groups[0].writers[0].kernel),
    )
    aligned, maps = align(
        model, variables, permuted, groups=groups, method=method, inputs=inputs, num_samples=20
    )
    for g in groups:  # row k of the map selects the copy's channel holding channel k
        np.testing.assert_array_equal(maps[g.index], np.eye(g.size)[np.argsort(perms[g.index])])
    assert_trees_equal(aligned, variables, atol=1e-6)
    fused = fuse(
        model, [variables, permuted], groups=groups, method=method, inputs=inputs, num_samples=20
    )
    assert_trees_equal(fused, variables, atol=1e-6)


def test_three_models_and_sinkhorn_solver(tiny_resnet):
    model, variables, x = tiny_resnet
    groups = ifjax.discover_groups(model, variables, x)
    copies = [_permute(variables, groups, seed)[0] for seed in (2, 3)]
    fused = fuse(
        model,
        [variables, *copies],
        example_input=x,
        inputs=_inputs(x.shape),
        num_samples=SAMPLES,
        solver="sinkhorn",
    )
    assert_trees_equal(fused, variables, atol=1e-5)


def _bn0_output(variables, x):
    """VGG's first BatchNorm output, computed by hand: (N, H, W, C)."""
    p, s = variables["params"], variables["batch_stats"]
    y = jax.lax.conv_general_dilated(
        x, p["conv0"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = y + p["conv0"]["bias"]
    y = (y - s["bn0"]["mean"]) / jnp.sqrt(s["bn0"]["var"] + 1e-5)
    return np.asarray(y * p["bn0"]["scale"] + p["bn0"]["bias"])


def _assignment(features_a, features_b):
    """Exact OT between equal uniform marginals = linear assignment; perm[k] = b's channel."""
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    a, b = unit(features_a), unit(features_b)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # (anchor, other)
    rows, cols = linear_sum_assignment(cost)
    assert np.array_equal(rows, np.arange(len(rows)))
    return cols


def test_two_different_models_average_their_aligned_weights(tiny_vgg):
    model, _, x = tiny_vgg
    a, b = random_variables(model, x, seed=0), random_variables(model, x, seed=1)
    inputs = _inputs(x.shape)
    groups = ifjax.discover_groups(model, a, x)
    assert groups[2].writers[0].kernel == ("params", "conv0", "kernel")
    fused = fuse(model, [a, b], groups=groups, inputs=inputs, num_samples=SAMPLES)
    logits = model.apply(fused, x)
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
    # group 2 (conv0 -> bn0) by hand: BatchNorm outputs, normalized, squared distance
    channels = lambda y: np.moveaxis(y, -1, 0).reshape(y.shape[-1], -1)
    perm = _assignment(channels(_bn0_output(a, inputs)), channels(_bn0_output(b, inputs)))
    assert not np.array_equal(perm, np.arange(8))
    _, maps = align(model, a, b, groups=groups, inputs=inputs, num_samples=SAMPLES)
    np.testing.assert_array_equal(np.argmax(maps[2], axis=1), perm)
    get = lambda tree, *path: np.asarray(tree_get(tree, path))
    for path in [
        ("params", "conv0", "kernel"),
        ("params", "conv0", "bias"),
        ("params", "bn0", "scale"),
        ("batch_stats", "bn0", "mean"),
    ]:
        expected = (get(a, *path) + np.take(get(b, *path), perm, axis=-1)) / 2
        np.testing.assert_allclose(get(fused, *path), expected, rtol=1e-6, atol=1e-7)
    mean_a, mean_b = (
        get(a, "batch_stats", "bn0", "mean"),
        get(b, "batch_stats", "bn0", "mean")[perm],
    )
    var_a, var_b = get(a, "batch_stats", "bn0", "var"), get(b, "batch_stats", "bn0", "var")[perm]
    mean = (mean_a + mean_b) / 2
    variance = (var_a + mean_a**2 + var_b + mean_b**2) / 2 - mean**2
    np.testing.assert_allclose(get(fused, "batch_stats", "bn0", "var"), variance, rtol=1e-5)
    # conv1 reads group 2 (input axis) and writes group 1 (output axis)
    out_perm = np.argmax(maps[1], axis=1)
    kernel_b = get(b, "params", "conv1", "kernel")[:, :, perm, :][..., out_perm]
    expected = (get(a, "params", "conv1", "kernel") + kernel_b) / 2
    np.testing.assert_allclose(get(fused, "params", "conv1", "kernel"), expected, rtol=1e-6)


def test_weight_based_alignment_of_the_first_group_by_hand(tiny_vgg):
    model, _, x = tiny_vgg
    a, b = random_variables(model, x, seed=0), random_variables(model, x, seed=1)
    groups = ifjax.discover_groups(model, a, x)
    rows = lambda v: np.moveaxis(np.asarray(v["params"]["conv0"]["kernel"]), -1, 0).reshape(8, -1)
    perm = _assignment(rows(a), rows(b))  # conv0 reads the input: its rows are comparable
    _, maps = align(model, a, b, groups=groups, method="weight")
    np.testing.assert_array_equal(np.argmax(maps[2], axis=1), perm)
    fused = fuse(model, [a, b], groups=groups, method="weight")
    expected = (
        np.asarray(a["params"]["conv0"]["kernel"]) + rows(b)[perm].T.reshape(3, 3, 3, 8)
    ) / 2
    np.testing.assert_allclose(fused["params"]["conv0"]["kernel"], expected, rtol=1e-6)


def test_fusing_pruned_models_of_equal_widths(tiny_vgg):
    model, variables, x = tiny_vgg
    pruned_model, pruned, _ = ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x)
    groups = ifjax.discover_groups(pruned_model, pruned, x)
    assert [g.size for g in groups] == [8, 8, 4]
    permuted, _ = _permute(pruned, groups, seed=4)
    fused = fuse(
        pruned_model, [pruned, permuted], groups=groups, inputs=_inputs(x.shape), num_samples=8
    )
    assert_trees_equal(fused, pruned, atol=1e-6)
    np.testing.assert_allclose(
        pruned_model.apply(fused, x), pruned_model.apply(pruned, x), rtol=1e-5, atol=1e-5
    )


def test_activation_cost_from_statistics_equals_the_direct_distances():
    rng = np.random.default_rng(0)
    parts = {}
    for name, size in (("bn_a", 50), ("bn_b", 40)):  # two writers of a group (a stream)
        anchor, other = rng.normal(size=(3, size)), rng.normal(size=(3, size))
        other[1] = 0.0  # a dead channel: its normalized vector is zero, never NaN
        parts[name] = (anchor, other)
    stats = tuple(
        {m: f(*p) for m, p in parts.items()}
        for f in (
            lambda a, b: (a**2).sum(1),
            lambda a, b: (b**2).sum(1),
            lambda a, b: a @ b.T,
        )
    )
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-30)
    direct = [((unit(b)[:, None, :] - unit(a)[None, :, :]) ** 2).sum(-1) for a, b in parts.values()]
    expected = (direct[0] + direct[1]) / 2  # (other, anchor), mean over the writers
    np.testing.assert_allclose(_activation_cost(stats, list(parts)), expected, atol=1e-12)
    np.testing.assert_allclose(expected[1], 1.0)  # |0 - unit|^2


def test_average_variables_combines_batchnorm_statistics_as_a_mixture():
    first = {
        "params": {"w": jnp.array([1.0, 2.0])},
        "batch_stats": {"bn": {"mean": jnp.array([0.0, 1.0]), "var": jnp.array([1.0, 4.0])}},
    }
    second = {
        "params": {"w": jnp.array([3.0, 6.0])},
        "batch_stats": {"bn": {"mean": jnp.array([2.0, 3.0]), "var": jnp.array([1.0, 0.0])}},
    }
    out = average_variables([first, second])
    np.testing.assert_allclose(out["params"]["w"], [2.0, 4.0])
    np.testing.assert_allclose(out["batch_stats"]["bn"]["mean"], [1.0, 2.0])
    # mixture of N(0, 1) and N(2, 1): E[x^2] = (1 + 5) / 2 = 3, var = 3 - 1 = 2
    np.testing.assert_allclose(out["batch_stats"]["bn"]["var"], [2.0, (5.0 + 9.0) / 2 - 4.0])


def test_bad_input(tiny_vgg, tiny_resnet):
    model, variables, x = tiny_vgg
    with pytest.raises(ValueError, match="needs inputs"):
        fuse(model, [variables, variables], example_input=x)
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse(model, [variables, variables], example_input=x, method="magic")
    with pytest.raises(ValueError, match="at least two"):
        fuse(model, [variables], example_input=x, method="weight")
    narrow = VGG(cfg=(4, "M", 16, "M", 16, "M"))
    with pytest.raises(ValueError, match="same variables and shapes"):
        fuse(model, [variables, random_variables(narrow, x)], example_input=x, method="weight")
    with pytest.raises(ValueError, match="need 200 input samples"):
        fuse(model, [variables, variables], example_input=x, inputs=_inputs(x.shape))
