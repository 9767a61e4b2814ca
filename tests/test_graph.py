"""Dependency groups discovered from the jaxpr match the reference's."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from models import VGG, resnet18, resnet50, vgg11_bn
from models.torch_weights import torch_module_names
from tests.golden import GOLDEN, available


def _abstract_variables(model, x):
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _torch_groups(model, groups):
    names = torch_module_names(model)
    torch = lambda module: names["/".join(module)][0]
    return [
        (g.size, {torch(w.module) for w in g.writers}, {torch(r.module) for r in g.readers})
        for g in groups
    ]


def _reference_groups(entries):
    return [(e["n"], set(e["out_channel_layers"]), set(e["in_channel_layers"])) for e in entries]


FULL = [
    ("vgg11_bn_cifar", vgg11_bn, 32, 8),
    ("resnet18_cifar", resnet18, 32, 12),
    ("resnet50_torchvision", resnet50, 64, 37),
]


@pytest.mark.skipif(not available(), reason="../shared/golden not present")
@pytest.mark.parametrize("key,factory,size,count", FULL)
def test_full_model_groups_match_reference(key, factory, size, count):
    reference = json.loads((GOLDEN / "groups_full_models.json").read_text())[key]["groups"]
    model = factory()
    x = jnp.zeros((1, size, size, 3))
    groups = ifjax.discover_groups(model, _abstract_variables(model, x), x)
    assert len(groups) == count
    assert _torch_groups(model, groups) == _reference_groups(reference)
    assert [g.index for g in groups] == list(range(count))


@pytest.mark.skipif(not available(), reason="../shared/golden not present")
@pytest.mark.parametrize("name", ["vgg11_tiny", "resnet18_tiny"])
def test_tiny_model_groups_match_golden(name):
    from tests.golden import Golden

    golden = Golden(name)
    groups = ifjax.discover_groups(golden.model, golden.variables, golden.x)
    assert _torch_groups(golden.model, groups) == _reference_groups(golden.meta["groups"])


def test_classifier_outputs_and_input_channels_are_never_grouped():
    model = VGG(cfg=(4, "M", 8, "M"), num_classes=3)
    x = jnp.zeros((1, 8, 8, 3))
    groups = ifjax.discover_groups(model, _abstract_variables(model, x), x)
    writers = {w.module for g in groups for w in g.writers}
    assert ("classifier",) not in writers
    assert [g.size for g in groups] == [8, 4]


def test_flatten_of_several_positions_into_dense():
    model = VGG(cfg=(4, "M", 6, "M"), num_classes=3)  # 16x16 -> 4x4x6 flattened
    x = jnp.zeros((1, 16, 16, 3))
    groups = ifjax.discover_groups(model, _abstract_variables(model, x), x)
    (reader,) = groups[0].readers
    assert reader.module == ("classifier",)
    assert (reader.outer, reader.inner) == (16, 1)
    assert groups[0].size == 6


def test_batchnorm_and_bias_attached_to_their_writer():
    model = resnet18(widths=(2, 4, 4, 4))
    x = jnp.zeros((1, 32, 32, 3))
    groups = ifjax.discover_groups(model, _abstract_variables(model, x), x)
    for group in groups:
        for w in group.writers:
            assert w.bias == w.kernel[:-1] + ("bias",)
            assert w.batchnorm is not None
            assert w.batchnorm.module[:-1] == w.module[:-1]


class _ConcatTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = nn.Conv(4, (3, 3), name="features")(x)
        return nn.Dense(2)(jnp.concatenate([a, a], axis=-1).mean((1, 2)))


class _Multiplier(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.Conv(8, (3, 3), feature_group_count=4, name="depthwise")(x)
        return nn.Dense(2)(x.mean((1, 2)))


class _ConcatAdded(nn.Module):
    @nn.compact
    def __call__(self, x):
        a, b = nn.Conv(2, (3, 3))(x), nn.Conv(2, (3, 3))(x)
        c = nn.Conv(4, (3, 3))(x)
        return nn.Dense(2)((jnp.concatenate([a, b], axis=-1) + c).mean((1, 2)))


def test_jitted_function_named_conv_general_dilated_is_a_convolution():
    def conv_general_dilated(x, kernel, *args, **kwargs):  # computed another way
        patches = jax.lax.conv_general_dilated_patches(
            x, kernel.shape[:2], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        k = kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1])
        return patches @ k

    fast = jax.jit(conv_general_dilated)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(
                nn.Conv(4, (3, 3), conv_general_dilated=lambda *a, **k: fast(a[0], a[1]))(x)
            )
            return nn.Dense(2)(nn.Conv(6, (3, 3))(x).mean((1, 2)))

    x = jnp.ones((1, 8, 8, 3))
    variables = Net().init(jax.random.key(0), x)
    groups = ifjax.discover_groups(Net(), variables, x)
    assert [(g.size, g.writers[0].module, g.readers[0].module) for g in groups] == [
        (6, ("Conv_1",), ("Dense_0",)),
        (4, ("Conv_0",), ("Conv_1",)),
    ]


class _LayerNormMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.Dense(8)(x))
        shift = self.param("shift", nn.initializers.zeros_init(), (8,))  # bias-only op
        x = nn.gelu(x + shift)
        return nn.Dense(2)(x)


def test_layernorm_couples_the_features_it_normalizes():
    x = jnp.ones((2, 5))
    variables = _LayerNormMlp().init(jax.random.key(0), x)
    (group,) = ifjax.discover_groups(_LayerNormMlp(), variables, x)
    assert group.size == 8
    assert [w.module for w in group.writers] == [("Dense_0",)]
    assert [r.module for r in group.readers] == [("Dense_1",)]
    assert {"/".join(p) for p, _ in group.channel_params} == {
        "params/Dense_0/bias",
        "params/LayerNorm_0/scale",
        "params/LayerNorm_0/bias",
        "params/shift",
    }


@pytest.mark.parametrize(
    "module,operation,layer",
    [
        (_ConcatTwice(), "concatenate: concatenates the same channels twice", ""),
        (_Multiplier(), "conv_general_dilated: depthwise convolution depthwise with", "depthwise"),
        (_ConcatAdded(), "concatenate: a concatenation of channels is combined", ""),
    ],
)
def test_unanalysable_operations_name_operation_and_layer(module, operation, layer):
    x = jnp.zeros((1, 8, 8, 3))
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(ifjax.GraphError, match=f"{operation}.*in layer .*{layer}") as error:
        ifjax.discover_groups(module, variables, x)
    assert "test_graph.py" in str(error.value)  # the user's source line


def test_nnx_layernorm_and_sequential():
    from flax import nnx

    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Linear(5, 8, rngs=rngs), nnx.LayerNorm(8, rngs=rngs), nnx.relu,
        nnx.Linear(8, 3, rngs=rngs),
    )  # fmt: skip
    (group,) = ifjax.discover_groups(model, jnp.ones((2, 5)))
    assert group.size == 8
    assert group.writers[0].kernel == ("params", "layers", "0", "kernel")
    assert group.readers[0].kernel == ("params", "layers", "3", "kernel")
    # LayerNorm normalizes over the group: "all" leaves it, it is pruned when asked for
    assert group.kind == "residual"
    _, plans = ifjax.prune(model, "all", sparsity=0.5, example_input=jnp.ones((2, 5)))
    assert plans == []
    small, _ = ifjax.prune(model, group, sparsity=0.5, example_input=jnp.ones((2, 5)))
    assert small.layers[1].num_features == 4 and small(jnp.ones((2, 5))).shape == (2, 3)
