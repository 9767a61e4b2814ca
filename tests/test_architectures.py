"""Architectures beyond plain ResNets, written as their users write them
(``tests/clients_arch.py``): depthwise and grouped convolutions, channel concatenation,
GroupNorm and weight-standardized convolutions, and widths rounded with ``round_to``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from tests import clients_arch as arch
from tests.clients import nnx_train_step

EVAL = {"train": False}
LINEN = {
    "mobilenet": (arch.linen_mobilenet, {}),
    "convnext": (arch.linen_convnext, {}),
    "densenet": (arch.linen_densenet, {}),
    "unet": (arch.linen_unet, {}),
    "unet_resize": (arch.linen_unet, {"upsample": "resize"}),
    "groupnorm_resnet": (arch.linen_groupnorm_resnet, {}),
    "resnext": (arch.linen_resnext, {}),
}


def _count(params) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def _scale_error(out, expected) -> float:
    return float(jnp.max(jnp.abs(out - expected)) / jnp.max(jnp.abs(expected)))


def _train_step(name, model, variables, x):
    if name.startswith("unet"):
        return arch.linen_unet_train_step(model, variables, x, arch.label_maps(x))
    labels = jnp.arange(x.shape[0]) % 10
    return arch.linen_classifier_train_step(model, variables, x, labels)


# Default pruning of every client runs with -m slow; by default it runs on the depthwise
# (mobilenet) and concatenating (densenet) clients, Intra-Fusion on all (CI time: issue 18)
_DEFAULT_BY_DEFAULT = ("densenet", "mobilenet")
CASES = [
    pytest.param(
        name,
        method,
        marks=[pytest.mark.slow] if method == "default" and name not in _DEFAULT_BY_DEFAULT else [],
    )
    for name in sorted(LINEN)
    for method in ("default", "intra_fusion")
]


@pytest.mark.parametrize("name,method", CASES)
def test_client_pruned_at_half_runs_and_matches_masked(name, method):
    build, kwargs = LINEN[name]
    model, variables, x = build(**kwargs)
    options = dict(sparsity=0.5, method=method, example_input=x, apply_kwargs=EVAL)
    small_model, small, plans = ifjax.prune(model, variables, "all", **options)
    assert plans and _count(small["params"]) < 0.75 * _count(variables["params"])
    out = small_model.apply(small, x, **EVAL)
    assert out.shape == model.apply(variables, x, **EVAL).shape
    assert bool(jnp.all(jnp.isfinite(out)))
    # training mode in the user's own step (BatchNorm statistics updated)
    trained, loss = _train_step(name, small_model, small, x)
    assert np.isfinite(float(loss))
    assert jax.tree.map(jnp.shape, trained["params"]) == jax.tree.map(jnp.shape, small["params"])
    if name == "groupnorm_resnet":  # GroupNorm's statistics change: no masked equivalent
        with pytest.raises(ValueError, match="GroupNorm .*masked form"):
            ifjax.prune(model, variables, "all", masked=True, **options)
        return
    _, masked, _ = ifjax.prune(model, variables, "all", masked=True, **options)
    assert _scale_error(out, model.apply(masked, x, **EVAL)) < 1e-4
    assert _scale_error(out, model.apply(variables, x, **EVAL)) > 1e-3  # it did prune


def test_depthwise_convolution_joins_its_input_group():
    model, variables, x = arch.linen_mobilenet()
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=EVAL)
    block = next(g for g in groups if g.layer == "InvertedResidual_1")
    assert [w.module for w in block.writers] == [
        ("InvertedResidual_1", "expand"),
        ("InvertedResidual_1", "depthwise"),
    ]
    depthwise = block.writers[1]
    assert depthwise.axis == 3 and depthwise.batchnorm.module == (
        "InvertedResidual_1",
        "depthwise_bn",
    )
    assert [r.module for r in block.readers] == [("InvertedResidual_1", "project")]
    small_model, small, _ = ifjax.prune(
        model, variables, [block], sparsity=0.5, method="default", apply_kwargs=EVAL
    )
    kernel = small["params"]["InvertedResidual_1"]["depthwise"]["kernel"]
    assert kernel.shape == (3, 3, 1, block.size // 2)
    small_model.apply(small, x, **EVAL)


def test_nnx_mobilenet_pruned_at_half():
    module, x = arch.nnx_mobilenet()
    expected = module(x)
    for method in ("default", "intra_fusion"):
        small, plans = ifjax.prune(module, "all", sparsity=0.5, method=method, example_input=x)
        masked, _ = ifjax.prune(
            module, "all", sparsity=0.5, method=method, example_input=x, masked=True
        )
        out = small(x)
        assert _scale_error(out, masked(x)) < 1e-4
        assert _scale_error(out, expected) > 1e-3
        depthwise = small.blocks[1].depthwise
        assert depthwise.feature_group_count == depthwise.kernel[...].shape[-1]
        loss = nnx_train_step(small, x, jnp.arange(x.shape[0]) % 10)
        assert np.isfinite(float(loss))
    np.testing.assert_array_equal(module(x), expected)  # the input module is untouched


class _DuplicatedConcat(nn.Module):
    """A stem whose features are concatenated with a branch's (DenseNet-style)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        stem = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        branch = nn.relu(nn.Conv(4, (3, 3), name="branch")(stem))
        y = jnp.concatenate([stem, branch], axis=-1)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="norm")(y))
        y = nn.Conv(6, (1, 1), name="reader")(y)
        return nn.Dense(3, name="head")(y.mean((1, 2)))


def test_duplicate_channels_in_a_concatenated_segment_merge_back_exactly():
    model = _DuplicatedConcat()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    pairs = np.array([0, 0, 1, 1])  # branch channels 2k and 2k+1 are copies
    params = jax.tree.map(np.asarray, variables["params"])
    params["branch"]["kernel"] = params["branch"]["kernel"][..., pairs]
    params["branch"]["bias"] = np.array([0.1, 0.1, -0.2, -0.2], np.float32)
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    rng = np.random.default_rng(0)
    segment = np.concatenate([np.arange(4), 4 + pairs])  # BatchNorm: branch half copied
    for tree, name, low in ((params, "scale", 0.5), (params, "bias", -0.5), (stats, "mean", -0.5),
                            (stats, "var", 0.5)):  # fmt: skip
        tree["norm"][name] = rng.uniform(low, 1.5, 8).astype(np.float32)[segment]
    variables = {"params": params, "batch_stats": stats}
    groups = ifjax.discover_groups(model, variables, x)
    branch = next(g for g in groups if g.layer == "branch")
    assert dict(branch.segments)[("params", "reader", "kernel")] == (
        ifjax.SizeOf(("params", "stem", "kernel"), 3),
    )
    pruner = ifjax.intra_fusion(0.5, map_normalization="row_average")
    scores = jnp.array([2.0, 1.0, 1.0, 2.0])  # one copy of each pair kept
    plan = pruner.plan(variables, branch, scores=scores)
    np.testing.assert_array_equal(plan.keep, [0, 3])
    merged = pruner.apply(variables, branch, plan)
    assert merged["params"]["reader"]["kernel"].shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(
        merged["batch_stats"]["norm"]["mean"][:4], stats["norm"]["mean"][:4]
    )
    small_model = ifjax.model_for(model, merged)
    np.testing.assert_allclose(
        small_model.apply(merged, x), model.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_segments_follow_the_groups_pruned_before():
    """Pruning the first segment of a concatenation first moves the second one's offset."""
    model, variables, x = arch.linen_densenet()
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=EVAL)
    concatenated = [g for g in groups if any(before for _, before in g.segments)]
    assert len(concatenated) == 3  # each dense layer's new features after the stem's
    options = dict(sparsity=0.5, method="default", apply_kwargs=EVAL)
    for order in (groups, groups[::-1]):
        small_model, small, _ = ifjax.prune(model, variables, list(order), **options)
        _, masked, _ = ifjax.prune(model, variables, list(order), masked=True, **options)
        out = small_model.apply(small, x, **EVAL)
        assert _scale_error(out, model.apply(masked, x, **EVAL)) < 1e-4


def test_grouped_convolution_prunes_equal_numbers_per_group():
    model, variables, x = arch.linen_resnext()
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=EVAL)
    assert [(g.size, g.blocks) for g in groups] == [(16, 1), (16, 2), (16, 2), (16, 4), (16, 4)]
    assert {p.layer for g in groups[3:] for p in g.partitions} == {"ResNeXtBlock_0/Conv_1"}
    first = groups[4]  # read by the grouped convolution (its input channels)
    scores = jnp.arange(16.0) % 5 + jnp.arange(16.0) / 100  # unequal per block
    for group in groups[3:]:  # its input, then its output channels
        for pruner in (ifjax.default_pruning(0.5), ifjax.intra_fusion(0.5)):
            plan = pruner.plan(variables, group, scores=scores)
            np.testing.assert_array_equal(np.asarray(plan.keep) // 4, [0, 0, 1, 1, 2, 2, 3, 3])
            inside = np.kron(np.eye(4), np.ones((2, 4)))  # maps stay inside conv groups
            assert np.all(np.asarray(plan.reader_map)[inside == 0] == 0)
        # Intra-Fusion: every channel's mass goes to kept channels of its own block
        np.testing.assert_allclose(np.asarray(plan.reader_map).sum(0), 1, rtol=1e-5)
    with pytest.raises(ValueError, match="width 6 is not a multiple of 4.*ResNeXtBlock_0/Conv_1"):
        ifjax.prune(model, variables, [first], widths={first.index: 6}, apply_kwargs=EVAL)
    small_model, small, _ = ifjax.prune(
        model, variables, "all", sparsity=0.6, method="default", example_input=x,
        apply_kwargs=EVAL,
    )  # fmt: skip
    conv = small["params"]["ResNeXtBlock_0"]["Conv_1"]["kernel"]
    assert conv.shape == (3, 3, 1, 4)  # 16 -> int(6.4) = 6 -> 4: one per group
    small_model.apply(small, x, **EVAL)


def test_groupnorm_keeps_its_norm_groups_valid():
    model, variables, x = arch.linen_groupnorm_resnet()
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=EVAL)
    assert all(g.normalized_in_blocks and g.blocks == 4 for g in groups)
    block1 = next(g for g in groups if g.layer == "block1")
    assert [p.layer.split("/")[-1] for p in block1.partitions] == ["gn1"]
    small_model, small, plans = ifjax.prune(
        model, variables, "all", sparsity=0.7, method="intra_fusion", example_input=x,
        apply_kwargs=EVAL,
    )  # fmt: skip
    for group, plan in zip(groups, plans, strict=True):
        kept = np.asarray(plan.keep) // (group.size // 4)
        np.testing.assert_array_equal(np.bincount(kept, minlength=4), [len(kept) // 4] * 4)
    assert bool(jnp.all(jnp.isfinite(small_model.apply(small, x, **EVAL))))


def test_weight_standardized_convolutions_are_layers_of_their_groups():
    model, variables, x = arch.linen_groupnorm_resnet()
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=EVAL)
    writers = {w.module for g in groups for w in g.writers}
    readers = {r.module for g in groups for r in g.readers}
    assert ("block2", "conv1") in writers and ("block2", "conv2") in readers


@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_round_to_keeps_multiples(method, tiny_resnet):
    model, variables, x = tiny_resnet
    groups = ifjax.discover_groups(model, variables, x)
    assert sorted({g.size for g in groups}) == [4, 8]
    for sparsity in (0.1, 0.3, 0.6, 0.9):
        small_model, small, plans = ifjax.prune(
            model, variables, "all", sparsity=sparsity, method=method, example_input=x,
            round_to=2,
        )  # fmt: skip
        for group, plan in zip(groups, plans, strict=True):
            m, exact = plan.keep.shape[0], group.size * (1 - sparsity)
            assert m % 2 == 0 and 2 <= m < group.size  # never zero, never all
            assert abs(m - exact) <= 1 or m in (2, group.size - 2)  # nearest, else clamped
        small_model.apply(small, x)


def test_round_to_bad_input(tiny_resnet):
    model, variables, x = tiny_resnet
    groups = ifjax.discover_groups(model, variables, x)
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="round_to must be a positive integer"):
            ifjax.prune(model, variables, "all", sparsity=0.5, example_input=x, round_to=bad)
    smallest = min(groups, key=lambda g: g.size)
    with pytest.raises(ValueError, match=rf"group {smallest.index} .*round_to is too large"):
        ifjax.prune(
            model, variables, [smallest], sparsity=0.5, method="default", round_to=smallest.size
        )


def test_alignment_permutes_concatenated_segments_exactly():
    """OTFusion's alignment of a DenseNet to a copy of itself with permuted channels
    undoes the permutation, each segment of the concatenations moving with its group."""
    model, variables, x = arch.linen_densenet()
    groups = ifjax.discover_groups(model, variables, x, apply_kwargs=EVAL)
    permuted = variables
    rng = np.random.default_rng(0)
    for group in groups:
        order = rng.permutation(group.size)
        permuted = ifjax.merge_group(permuted, group, *(jnp.eye(group.size)[order],) * 2, order)
    np.testing.assert_allclose(
        model.apply(permuted, x, **EVAL), model.apply(variables, x, **EVAL), rtol=1e-5, atol=1e-5
    )
    aligned, maps = ifjax.align(
        model, variables, permuted, groups=groups, method="weight", apply_kwargs=EVAL
    )
    for group in groups:
        assert np.all(np.isin(np.asarray(maps[group.index]), [0.0, 1.0]))
    for got, want in zip(jax.tree.leaves(aligned), jax.tree.leaves(variables), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_fusion_refuses_groups_in_blocks():
    model, variables, x = arch.linen_resnext()
    with pytest.raises(
        ValueError, match="group 1 of ResNeXtBlock_1 .*ResNeXtBlock_1/Conv_1.*mix the blocks"
    ):
        ifjax.align(model, variables, variables, example_input=x, method="weight",
                    apply_kwargs=EVAL)  # fmt: skip


class _SelfResidual(nn.Module):
    """A 1x1 convolution added to its own input: it reads and writes the same group."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
        x = x + nn.Conv(8, (1, 1), name="mix")(x)
        return nn.Dense(3, name="head")(x.mean((1, 2)))


@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_layer_reading_and_writing_one_group(method):
    model = _SelfResidual()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    (group,) = ifjax.discover_groups(model, variables, x)
    assert ("mix",) in {w.module for w in group.writers} & {r.module for r in group.readers}
    options = dict(sparsity=0.5, method=method, example_input=x)
    small_model, small, _ = ifjax.prune(model, variables, "all", **options)
    assert small["params"]["mix"]["kernel"].shape == (1, 1, 4, 4)
    _, masked, _ = ifjax.prune(model, variables, "all", masked=True, **options)
    assert _scale_error(small_model.apply(small, x), model.apply(masked, x)) < 1e-4


class _GroupSizeNorm(nn.Module):
    """GroupNorm given by its group size (4 norm groups of 4 channels)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), name="conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=None, group_size=4, name="norm")(x))
        return nn.Dense(3, name="head")(x.mean((1, 2)))


def test_groupnorm_given_by_group_size_keeps_its_norm_groups():
    model = _GroupSizeNorm()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    (group,) = ifjax.discover_groups(model, variables, x)
    assert group.blocks == 4 and group.normalized_in_blocks
    small_model, small, (plan,) = ifjax.prune(
        model, variables, [group], sparsity=0.5, method="default"
    )
    keep = np.asarray(plan.keep)
    np.testing.assert_array_equal(np.bincount(keep // 4, minlength=4), [2, 2, 2, 2])

    def reference(x):  # the pruned network with 4 norm groups of 2 channels, by hand
        p = small["params"]
        y = (
            jax.lax.conv_general_dilated(
                x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            + p["conv"]["bias"]
        )
        g = y.reshape(y.shape[:-1] + (4, 2))
        mean = g.mean((1, 2, 4), keepdims=True)
        var = ((g - mean) ** 2).mean((1, 2, 4), keepdims=True)
        y = ((g - mean) / jnp.sqrt(var + 1e-6)).reshape(y.shape)
        y = nn.relu(y * p["norm"]["scale"] + p["norm"]["bias"])
        return y.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]

    np.testing.assert_allclose(small_model.apply(small, x), reference(x), rtol=1e-4, atol=1e-5)
