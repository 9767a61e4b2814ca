"""Loading PyTorch state dicts (as numpy) into the Flax models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from models import VGG, resnet18
from models.torch_weights import load_torch_state_dict, torch_module_names
from tests.conftest import random_variables


def _to_torch(model, variables, x):
    """A torch-layout state dict written independently from the Flax variables."""
    state = {}
    spatial = None
    for path, (name, kind) in torch_module_names(model).items():
        node = variables["params"]
        for key in path.split("/"):
            node = node.get(key) if node is not None else None
        if node is None:
            continue
        if kind == "bn":
            stats = variables["batch_stats"]
            for key in path.split("/"):
                stats = stats[key]
            state |= {f"{name}.weight": node["scale"], f"{name}.bias": node["bias"]}
            state |= {f"{name}.running_mean": stats["mean"], f"{name}.running_var": stats["var"]}
            continue
        kernel = np.asarray(node["kernel"])
        if kind == "conv":
            state[f"{name}.weight"] = kernel.transpose(3, 2, 0, 1)
            spatial = kernel.shape[-1]
        else:  # Flax flattens (H, W, C); torch flattens (C, H, W)
            positions = kernel.shape[0] // spatial
            w = kernel.reshape(positions, spatial, -1).transpose(2, 1, 0)
            state[f"{name}.weight"] = w.reshape(w.shape[0], -1)
        state[f"{name}.bias"] = node["bias"]
        state[f"{name}.num_batches_tracked"] = np.array(3)
    return {k: np.asarray(v) for k, v in state.items()}


@pytest.mark.parametrize(
    "model,size",
    [(VGG(cfg=(4, "M", 6, "M"), num_classes=5), 16), (resnet18(widths=(4, 8, 8, 8)), 32)],
)
def test_roundtrip_through_torch_layout(model, size):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, 3)), jnp.float32)
    variables = random_variables(model, x)
    loaded_model, loaded = load_torch_state_dict(model, _to_torch(model, variables, x))
    assert loaded_model == model
    np.testing.assert_allclose(loaded_model.apply(loaded, x), model.apply(variables, x), rtol=1e-5)


def test_widths_follow_the_state_dict():
    small = VGG(cfg=(4, "M", 6, "M"), num_classes=5)
    x = jnp.zeros((1, 16, 16, 3))
    variables = small.init(jax.random.key(0), x)
    _, pruned, _ = ifjax.prune(small, variables, 0, sparsity=0.5, example_input=x)
    state = _to_torch(small.for_variables(pruned), pruned, x)
    model, _ = load_torch_state_dict(VGG(cfg=(64, "M", 64, "M"), num_classes=5), state)
    assert model.cfg == (4, "M", 3, "M")


def test_unused_and_missing_entries_are_named():
    model = VGG(cfg=(4, "M"), num_classes=2)
    x = jnp.zeros((1, 8, 8, 3))
    state = _to_torch(model, model.init(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match="extra.weight"):
        load_torch_state_dict(model, state | {"extra.weight": np.zeros(3)})
    del state["features.1.running_var"]
    with pytest.raises(ValueError, match="features.1.running_var"):
        load_torch_state_dict(model, state)
