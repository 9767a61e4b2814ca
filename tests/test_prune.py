"""Properties of BatchNorm folding, Default pruning and Intra-Fusion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax._tree import tree_get, tree_replace
from tests.tree_asserts import assert_trees_equal, copy_tree


def _setup(fixture):
    model, variables, x = fixture
    groups = ifjax.discover_groups(model, variables, x)
    return model, variables, x, groups, ifjax.fold_batchnorm(variables, groups)


@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_resnet"])
def test_fold_batchnorm_preserves_outputs(name, request):
    model, variables, x, groups, folded = _setup(request.getfixturevalue(name))
    expected = model.apply(variables, x)
    np.testing.assert_allclose(model.apply(folded, x), expected, rtol=1e-4, atol=1e-5)
    for group in groups:
        for w in group.writers:
            np.testing.assert_array_equal(tree_get(folded, w.batchnorm.var), 1.0)
            np.testing.assert_array_equal(tree_get(folded, w.batchnorm.mean), 0.0)


def test_fold_batchnorm_rounds_like_eager_jax_and_traces(tiny_vgg):
    """Folding runs in numpy (nothing to compile) with the bits of one XLA operation at a
    time, and under jit as part of the caller's computation."""
    model, variables, x, groups, folded = _setup(tiny_vgg)
    writer = groups[1].writers[0]
    bn = writer.batchnorm
    get = lambda path: tree_get(variables, path)
    factor = get(bn.scale) / jnp.sqrt(get(bn.var))
    np.testing.assert_array_equal(tree_get(folded, writer.kernel), get(writer.kernel) * factor)
    bias = (get(writer.bias) - get(bn.mean)) * factor + get(bn.bias)
    np.testing.assert_array_equal(tree_get(folded, writer.bias), bias)
    assert isinstance(tree_get(folded, writer.kernel), jax.Array)
    traced = jax.jit(lambda v: ifjax.fold_batchnorm(v, groups))(variables)
    assert jax.tree.structure(traced) == jax.tree.structure(folded)
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(folded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_default_pruning_equals_slicing(tiny_resnet):
    model, _, x, groups, folded = _setup(tiny_resnet)
    group = groups[3]
    pruner = ifjax.default_pruning(0.5, "l1")
    plan = pruner.plan(folded, group)
    pruned = pruner.apply(folded, group, plan)
    keep = np.asarray(plan.keep)
    assert len(keep) == 4 and np.all(np.diff(keep) > 0)
    get = lambda path: np.asarray(tree_get(folded, path))
    updates = {w.kernel: np.take(get(w.kernel), keep, w.axis) for w in group.writers}
    updates |= {r.kernel: np.take(get(r.kernel), keep, r.axis) for r in group.readers}
    updates |= {p: np.take(get(p), keep, a) for p, a in group.channel_params}
    for w in group.writers:
        updates[w.bias] = np.take(get(w.bias), keep)
    assert_trees_equal(pruned, tree_replace(folded, updates))
    # the kept channels are the most important ones
    scores = np.asarray(ifjax.group_importance(folded, group, "l1"))
    assert scores[keep].min() >= np.delete(scores, keep).max()


def _duplicated_model():
    """A VGG whose conv0 channels 4..7 are exact copies of channels 0..3."""
    from models import VGG

    model = VGG(cfg=(8, "M", 4), num_classes=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    v = model.init(jax.random.key(3), x)
    p = v["params"]
    dup = lambda a, axis: jnp.concatenate([jnp.take(a, jnp.arange(4), axis)] * 2, axis)
    params = {
        **p,
        "conv0": {"kernel": dup(p["conv0"]["kernel"], 3), "bias": jnp.linspace(-0.1, 0.2, 8) % 0.3},
        "conv1": {**p["conv1"], "kernel": dup(p["conv1"]["kernel"], 2)},
    }
    params["conv0"]["bias"] = dup(params["conv0"]["bias"], 0)
    return model, {**v, "params": params}, x


@pytest.mark.parametrize("normalization,exact", [("row_average", True), ("reference", False)])
def test_fusing_exact_duplicates(normalization, exact):
    model, variables, x = _duplicated_model()
    groups = ifjax.discover_groups(model, variables, x)
    folded = ifjax.fold_batchnorm(variables, groups)
    group = groups[-1]  # conv0's channels
    pruner = ifjax.intra_fusion(0.5, map_normalization=normalization)
    scores = jnp.array([8.0, 1.0, 7.0, 2.0, 3.0, 6.0, 4.0, 5.0])  # one copy of each pair kept
    plan = pruner.plan(folded, group, scores=scores)
    np.testing.assert_array_equal(plan.keep, [0, 2, 5, 7])
    pruned = pruner.apply(folded, group, plan)
    out, expected = model.for_variables(pruned).apply(pruned, x), model.apply(variables, x)
    if exact:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert np.abs(out - expected).max() > 1e-2  # the reference's summed rows are not


@pytest.mark.parametrize("method", ["default", "intra_fusion"])
@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_resnet"])
def test_masked_form_equals_physical(method, name, request):
    model, variables, x, groups, _ = _setup(request.getfixturevalue(name))
    kwargs = dict(sparsity=0.4, method=method, importance="l1")
    small_model, small, _ = ifjax.prune(model, variables, groups, **kwargs)
    same_model, masked, _ = ifjax.prune(model, variables, groups, masked=True, **kwargs)
    assert same_model is model
    assert jax.tree.map(np.shape, masked) == jax.tree.map(np.shape, variables)
    np.testing.assert_allclose(
        model.apply(masked, x), small_model.apply(small, x), rtol=1e-4, atol=1e-5
    )


def test_prune_all_groups_shrinks_every_group(tiny_resnet):
    model, variables, x, groups, _ = _setup(tiny_resnet)
    pruned_model, pruned, plans = ifjax.prune(
        model, variables, "all", sparsity=0.5, example_input=x
    )
    assert len(plans) == len(groups) == 12
    assert pruned_model.stream_widths == (2, 4, 4, 4)
    assert pruned_model.apply(pruned, x).shape == (4, 10)
    for group, plan in zip(groups, plans, strict=True):
        assert plan.keep.shape == (group.size // 2,)


def _cache_sizes():
    from ifjax import _prune

    functions = (
        _prune._scores,
        _prune._problem,
        _prune._solve_one,
        _prune._apply,
        _prune._apply_masked,
        _prune._masked_maps,
    )
    return [f._cache_size() for f in functions]


def test_no_recompilation_on_repeated_calls(tiny_vgg):
    model, variables, x, groups, folded = _setup(tiny_vgg)
    pruner = ifjax.intra_fusion(0.5)
    pruner.plan(folded, groups[1])
    pruner.apply(folded, groups[1], pruner.plan(folded, groups[1]))
    pruner.apply(folded, groups[1], pruner.plan(folded, groups[1]), masked=True)
    sizes = _cache_sizes()
    other = jax.tree.map(lambda a: a * 1.5, folded)  # new values, same shapes
    again = ifjax.intra_fusion(0.5)  # a new pruner with the same settings
    again.apply(other, groups[1], again.plan(other, groups[1]))
    again.apply(other, groups[1], again.plan(other, groups[1]), masked=True)
    assert _cache_sizes() == sizes


def test_compilations_are_shared_by_groups_and_sparsities():
    """Groups of equal structure and shapes share their compiled functions; the
    sparsity-independent part of a plan and the masked merge compile once per group."""
    from models import VGG
    from tests.conftest import random_variables

    # other tests in this worker (the golden cases) may have compiled these shapes already
    jax.clear_caches()
    # conv1 -> conv2 and conv2 -> conv3 have the same structure and shapes
    model = VGG(cfg=(8, "M", 8, 8, 8, "M"), num_classes=3)
    x = jnp.zeros((1, 8, 8, 3))
    variables = random_variables(model, x)
    groups = ifjax.discover_groups(model, variables, x)
    folded = ifjax.fold_batchnorm(variables, groups)
    twins = [g for g in groups if g.writers[0].module in (("conv1",), ("conv2",))]
    assert len(twins) == 2
    pruner = ifjax.intra_fusion(0.5)
    pruner.apply(folded, twins[0], pruner.plan(folded, twins[0]), masked=True)
    sizes = _cache_sizes()
    pruner.apply(folded, twins[1], pruner.plan(folded, twins[1]), masked=True)
    assert _cache_sizes() == sizes
    for sparsity in (0.25, 0.75):  # other m: only _problem, _solve_one, _masked_maps
        pruner = ifjax.intra_fusion(sparsity)
        pruner.apply(folded, twins[1], pruner.plan(folded, twins[1]), masked=True)
    grown = [after - before for before, after in zip(sizes, _cache_sizes(), strict=True)]
    assert grown == [0, 2, 2, 0, 0, 2]


def test_plan_groups_batches_same_sized_problems(tiny_resnet):
    _, _, _, groups, folded = _setup(tiny_resnet)
    # vmapped Sinkhorn iterates until every problem of the batch converged: close, not equal
    for solver, atol in (("exact", 1e-6), ("sinkhorn", 1e-3)):
        pruner = ifjax.intra_fusion(0.5, solver=solver)
        batched = pruner.plan_groups(folded, groups[:6])
        for group, plan in zip(groups[:6], batched, strict=True):
            single = pruner.plan(folded, group)
            np.testing.assert_array_equal(plan.keep, single.keep)
            np.testing.assert_allclose(plan.writer_map, single.writer_map, atol=atol)


def test_sinkhorn_reports_convergence(tiny_vgg):
    _, _, _, groups, folded = _setup(tiny_vgg)
    converged = ifjax.intra_fusion(0.5, solver="sinkhorn", epsilon=1e-2).plan(folded, groups[0])
    assert bool(converged.converged) and float(converged.marginal_error) < 1e-3
    capped = ifjax.intra_fusion(0.5, solver="sinkhorn", epsilon=1e-4, max_iterations=20)
    assert not bool(capped.plan(folded, groups[0]).converged)
    exact = ifjax.intra_fusion(0.5).plan(folded, groups[0])
    # columns of the map sum to 1 for both
    np.testing.assert_allclose(exact.reader_map.sum(0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(converged.reader_map.sum(0), 1.0, rtol=1e-2)


def test_exact_plan_keeps_each_kept_channel_on_itself(tiny_vgg):
    _, _, _, groups, folded = _setup(tiny_vgg)
    plan = ifjax.intra_fusion(0.3).plan(folded, groups[1])
    keep = np.asarray(plan.keep)
    np.testing.assert_allclose(plan.reader_map[np.arange(len(keep)), keep], 1.0, rtol=1e-5)
    np.testing.assert_allclose(plan.reader_map.sum(1), 16 / len(keep), rtol=1e-5)


def test_centroid_target_and_importance_marginals_run(tiny_vgg):
    model, variables, x, groups, _ = _setup(tiny_vgg)
    for options in ({"target": "centroids"}, {"marginals": "importance"}):
        pm, pv, _ = ifjax.prune(model, variables, groups[0], sparsity=0.5, **options)
        assert np.isfinite(pm.apply(pv, x)).all()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_bad_sparsity(sparsity, tiny_vgg):
    model, variables, x = tiny_vgg
    with pytest.raises(ValueError, match="sparsity"):
        ifjax.prune(model, variables, 0, sparsity=sparsity, example_input=x)
    with pytest.raises(ValueError, match="sparsity"):
        ifjax.intra_fusion(sparsity)


def test_sparsity_leaving_no_channel(tiny_vgg):
    model, variables, x = tiny_vgg
    with pytest.raises(
        ValueError, match=r"would prune every one of group 2 \(\d+ channels of conv"
    ):
        ifjax.prune(model, variables, 2, sparsity=0.95, example_input=x)


def test_group_from_another_model(tiny_vgg, tiny_resnet):
    _, _, _, resnet_groups, _ = _setup(tiny_resnet)
    model, variables, x = tiny_vgg
    with pytest.raises(ValueError, match="does not belong"):
        ifjax.prune(model, variables, resnet_groups[0], sparsity=0.5)
    with pytest.raises(ValueError, match="unknown group"):
        ifjax.prune(model, variables, 7, sparsity=0.5, example_input=x)


def test_group_with_mismatched_sizes(tiny_vgg):
    model, variables, x, groups, folded = _setup(tiny_vgg)
    broken = tree_replace(folded, {("params", "conv2", "kernel"): jnp.zeros((3, 3, 9, 16))})
    with pytest.raises(ValueError, match="does not match"):
        ifjax.intra_fusion(0.5).plan(broken, groups[1])


def test_variables_that_do_not_match_the_model(tiny_vgg):
    model, variables, x = tiny_vgg
    ifjax.check_variables_match(model, variables, x)
    wrong = tree_replace(variables, {("params", "conv0", "kernel"): jnp.zeros((3, 3, 3, 5))})
    with pytest.raises(ValueError, match="conv0/kernel"):
        ifjax.check_variables_match(model, wrong, x)


def test_nan_weights_are_rejected(tiny_vgg):
    model, variables, x = tiny_vgg
    bad = tree_replace(variables, {("params", "conv1", "kernel"): jnp.full((3, 3, 8, 16), jnp.nan)})
    with pytest.raises(ValueError, match="conv1/kernel contains NaN"):
        ifjax.prune(model, bad, 0, sparsity=0.5, example_input=x)


@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_all_zero_channels_give_no_nan(method, tiny_vgg):
    model, variables, x, groups, folded = _setup(tiny_vgg)
    group = groups[1]  # conv1 (16 channels) read by conv2
    zero_rows = {w.kernel: tree_get(folded, w.kernel).at[..., :5].set(0) for w in group.writers}
    zero_rows |= {
        r.kernel: tree_get(folded, r.kernel).at[:, :, :5, :].set(0) for r in group.readers
    }
    zeroed = tree_replace(folded, zero_rows)
    for importance in ("l1", "lamp", "lamp_released"):
        pm, pv, (plan,) = ifjax.prune(
            model, zeroed, group, sparsity=0.5, method=method, importance=importance, fold=False
        )
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(pv))
        assert np.isfinite(pm.apply(pv, x)).all()


def test_inputs_are_never_modified(tiny_resnet):
    model, variables, x = tiny_resnet
    before = copy_tree(variables)
    groups = ifjax.discover_groups(model, variables, x)
    ifjax.fold_batchnorm(variables, groups)
    ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x)
    ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x, masked=True)
    assert_trees_equal(variables, before)


def test_fold_and_prune_without_conv_bias():
    """Bias-free convolutions (ResNet50 style) keep the folded bias in the BatchNorm."""
    from models import resnet18
    from tests.conftest import random_variables

    model = resnet18(widths=(4, 8, 8, 8), use_bias=False)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = random_variables(model, x)
    groups = ifjax.discover_groups(model, variables, x)
    folded = ifjax.fold_batchnorm(variables, groups)
    np.testing.assert_allclose(
        model.apply(folded, x), model.apply(variables, x), rtol=1e-4, atol=1e-5
    )
    pm, pv, _ = ifjax.prune(model, variables, groups, sparsity=0.5)
    _, masked, _ = ifjax.prune(model, variables, groups, sparsity=0.5, masked=True)
    np.testing.assert_allclose(pm.apply(pv, x), model.apply(masked, x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- all groups


def _take_channels(value, keep, axis, outer=1, inner=1):
    """``np.take`` of the kept channels of an axis laid out as (outer, n, inner)."""
    moved = np.moveaxis(np.asarray(value), axis, 0)
    n = moved.shape[0] // (outer * inner)
    blocks = moved.reshape((outer, n, inner) + moved.shape[1:])
    taken = np.take(blocks, keep, axis=1).reshape((-1,) + moved.shape[1:])
    return np.moveaxis(taken, 0, axis)


def _slice_group(tree, group, keep):
    """``tree`` with every slice of the group's channels cut to ``keep``, by hand."""
    updates = {}
    get = lambda path: updates.get(path, tree_get(tree, path))
    for layer in (*group.writers, *group.readers):
        updates[layer.kernel] = _take_channels(
            get(layer.kernel), keep, layer.axis, layer.outer, layer.inner
        )
    for path, axis in group.channel_params:
        updates[path] = _take_channels(get(path), keep, axis)
    return tree_replace(tree, updates)


@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_resnet"])
def test_default_pruning_of_all_groups_equals_slicing_every_group(name, request):
    """All groups pruned at once equal np.take of every group's kept indices, each keep
    set the most important channels of the group when its turn came."""
    model, variables, x, groups, folded = _setup(request.getfixturevalue(name))
    pruned_model, pruned, plans = ifjax.prune(
        model, variables, "all", sparsity=0.5, method="default", example_input=x
    )
    assert len(plans) == len(groups)
    expected = folded
    for group, plan in zip(groups, plans, strict=True):
        keep = np.asarray(plan.keep)
        assert len(keep) == group.size // 2 and np.all(np.diff(keep) > 0)
        scores = np.asarray(ifjax.group_importance(expected, group, "l1"))
        assert scores[keep].min() >= np.delete(scores, keep).max()
        expected = _slice_group(expected, group, keep)
    assert_trees_equal(pruned, expected)
    assert jax.tree.map(np.shape, pruned) != jax.tree.map(np.shape, folded)
    np.testing.assert_allclose(
        pruned_model.apply(pruned, x), model.for_variables(expected).apply(expected, x), rtol=1e-6
    )


@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_resnet"])
def test_intra_fusion_of_all_groups_equals_one_group_at_a_time(name, request):
    """Pruning every group in one call equals pruning them one by one through the
    single-group path, each time on the pruned model with its groups discovered anew."""
    model, variables, x, groups, folded = _setup(request.getfixturevalue(name))
    options = dict(sparsity=0.5, importance="l2", marginals="importance")
    pruned_model, pruned, plans = ifjax.prune(model, variables, "all", example_input=x, **options)
    one_model, one = model, folded
    for i, group in enumerate(groups):
        found = ifjax.discover_groups(one_model, one, x)
        assert found[i].writers == group.writers and found[i].size == group.size
        pruner = ifjax.intra_fusion(0.5, "l2", marginals="importance")
        plan = pruner.plan(one, found[i])
        np.testing.assert_array_equal(plan.keep, plans[i].keep)
        np.testing.assert_allclose(plan.writer_map, plans[i].writer_map, rtol=1e-6, atol=1e-7)
        one = pruner.apply(one, found[i], plan)
        one_model = one_model.for_variables(one)
    assert one_model == pruned_model
    assert_trees_equal(pruned, one, rtol=1e-6, atol=1e-7)
    # not Default pruning: the merged channels differ from the sliced ones
    sliced = ifjax.prune(
        model, variables, "all", method="default", importance="l2", sparsity=0.5, example_input=x
    )[1]
    assert not np.allclose(pruned_model.apply(pruned, x), pruned_model.apply(sliced, x))
