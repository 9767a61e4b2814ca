"""Tests for models.registry: specs round-trip through JSON, models by name, init."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import VGG, resnet18, resnet50, vgg11_bn
from models.registry import build_model, create_model, init_variables, model_spec


def _roundtrip(model):
    return build_model(json.loads(json.dumps(model_spec(model))))


def _shapes(model, size=32):
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


@pytest.mark.parametrize(
    "name, factory, num_classes",
    [("vgg11_bn", vgg11_bn, 10), ("resnet18", resnet18, 100), ("resnet50", resnet50, 1000)],
)
def test_create_model_matches_factory_and_roundtrips(name, factory, num_classes):
    model = create_model(name, num_classes=num_classes, width_multiplier=0.5)
    assert model == factory(num_classes=num_classes, width_multiplier=0.5)
    rebuilt = _roundtrip(model)
    assert rebuilt == model
    assert type(rebuilt) is type(model)


def test_spec_is_plain_json_with_lists():
    spec = model_spec(VGG(cfg=(4, "M", 8), num_classes=3))
    assert spec == {
        "name": "VGG",
        "fields": {"cfg": [4, "M", 8], "num_classes": 3, "use_bias": True},
    }


def test_resnet_spec_fields():
    spec = model_spec(resnet18(num_classes=10, width_multiplier=0.25))
    assert spec["name"] == "ResNet"
    assert spec["fields"]["stream_widths"] == [16, 32, 64, 128]
    assert spec["fields"]["inner_widths"] == [[16], [16], [32], [32], [64], [64], [128], [128]]
    assert spec["fields"]["block"] == "basic"


def test_roundtrip_with_pruned_widths():
    vgg = VGG(cfg=(3, "M", 5, 7, "M"), num_classes=4, use_bias=False)
    resnet = resnet18(num_classes=7, width_multiplier=0.125).clone(
        stem_width=5,
        stream_widths=(5, 9, 13, 17),
        inner_widths=((3,), (4,), (6,), (7,), (11,), (12,), (15,), (16,)),
    )
    bottleneck = resnet50(num_classes=5, width_multiplier=0.0625).clone(stem_width=3)
    for model in (vgg, resnet, bottleneck):
        rebuilt = _roundtrip(model)
        assert rebuilt == model
        # The rebuilt model has exactly the shapes the model's variables have.
        assert jax.tree.map(np.shape, _shapes(rebuilt)) == jax.tree.map(np.shape, _shapes(model))
        assert model.for_variables(_shapes(model)) == rebuilt


def test_init_variables_deterministic_and_shaped():
    model = VGG(cfg=(4, "M", 8, "M"), num_classes=3)
    a = init_variables(model, 0, (1, 8, 8, 3))
    b = init_variables(model, 0, (1, 8, 8, 3))
    c = init_variables(model, 1, (1, 8, 8, 3))
    assert set(a) == {"params", "batch_stats"}
    assert a["params"]["conv1"]["kernel"].shape == (3, 3, 4, 8)
    assert a["params"]["classifier"]["kernel"].shape == (2 * 2 * 8, 3)
    np.testing.assert_array_equal(a["params"]["conv0"]["kernel"], b["params"]["conv0"]["kernel"])
    assert not np.array_equal(a["params"]["conv0"]["kernel"], c["params"]["conv0"]["kernel"])
    np.testing.assert_array_equal(a["batch_stats"]["bn0"]["var"], np.ones(4))


def test_errors():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg16", num_classes=10, width_multiplier=1.0)
    with pytest.raises(ValueError, match="Transformer"):
        build_model({"name": "Transformer", "fields": {}})
    with pytest.raises(ValueError, match="unknown fields"):
        build_model({"name": "VGG", "fields": {"cfg": [4], "depth": 3}})
    with pytest.raises(ValueError, match="no spec"):
        model_spec(nn.Dense(3))
