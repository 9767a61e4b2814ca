"""Models by name, and models as JSON-serialisable specs.

A spec is ``{"name": "VGG" | "ResNet" | "ViT" | "MobileNetV2", "fields": {...}}`` where
``fields`` are the model's constructor fields with tuples written as lists, so a spec survives
``json.dumps``/``json.loads`` and :func:`build_model` rebuilds an equal model (pruned
widths included). Checkpoints store the spec next to the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from models.mobilenet import MobileNetV2, mobilenetv2, mobilenetv2_small
from models.resnet import ResNet, resnet18, resnet50
from models.vgg import VGG, vgg11_bn
from models.vit import ViT, vit

__all__ = [
    "MODEL_CLASSES",
    "MODEL_FACTORIES",
    "build_model",
    "create_model",
    "init_variables",
    "model_spec",
]

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "VGG": VGG,
    "ResNet": ResNet,
    "ViT": ViT,
    "MobileNetV2": MobileNetV2,
}
MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "vgg11_bn": vgg11_bn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit": vit,
    "mobilenetv2": mobilenetv2,
    "mobilenetv2_small": mobilenetv2_small,
}
# Fields every Linen module has that are not part of its architecture.
_MODULE_FIELDS = ("parent", "name")


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def model_spec(model: nn.Module) -> dict[str, Any]:
    """Returns the JSON-serialisable spec of a registered model.

    Args:
      model: a ``VGG``, ``ResNet``, ``ViT`` or ``MobileNetV2`` (dense or pruned widths).

    Returns:
      ``{"name": class name, "fields": constructor fields, tuples as lists}``.

    Example:
      >>> model_spec(VGG(cfg=(4, "M", 8), num_classes=3))
      {'name': 'VGG', 'fields': {'cfg': [4, 'M', 8], 'num_classes': 3, 'use_bias': True}}
    """
    name = type(model).__name__
    if MODEL_CLASSES.get(name) is not type(model):
        raise ValueError(f"no spec for model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    fields = {
        f.name: _to_json(getattr(model, f.name))
        for f in dataclasses.fields(model)
        if f.name not in _MODULE_FIELDS
    }
    return {"name": name, "fields": fields}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuilds the model a spec describes (the inverse of :func:`model_spec`).

    Args:
      spec: ``{"name": ..., "fields": ...}`` as written by :func:`model_spec`.

    Returns:
      The model, with lists in fields turned back into tuples.

    Example:
      >>> model = resnet18(num_classes=10, width_multiplier=0.25)
      >>> build_model(json.loads(json.dumps(model_spec(model)))) == model
      True
    """
    try:
        cls = MODEL_CLASSES[spec["name"]]
        fields = {key: _from_json(value) for key, value in spec["fields"].items()}
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a model spec: {spec!r} ({error!r})") from error
    known = {f.name for f in dataclasses.fields(cls)} - set(_MODULE_FIELDS)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown fields {unknown} for model {spec['name']!r}")
    return cls(**fields)


def create_model(name: str, num_classes: int = 10, width_multiplier: float = 1.0) -> nn.Module:
    """Creates a model of the paper by name.

    Args:
      name: ``"vgg11_bn"``, ``"resnet18"``, ``"resnet50"``, ``"vit"`` or ``"mobilenetv2"``.
      num_classes: classifier outputs.
      width_multiplier: scales every width (at least one channel per layer).

    Example:
      >>> create_model("vgg11_bn", num_classes=10, width_multiplier=0.5).cfg[0]
      32
    """
    if name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_FACTORIES)}")
    return MODEL_FACTORIES[name](num_classes=num_classes, width_multiplier=width_multiplier)


def init_variables(
    model: nn.Module, seed: int, input_shape: Sequence[int] = (1, 32, 32, 3)
) -> dict[str, Any]:
    """Initialises a model's variables (``params`` and ``batch_stats``).

    Args:
      model: a Linen model called as ``model(x, train=False)``.
      seed: seed of the initialisation key.
      input_shape: (N, H, W, C) of a dummy input; only H, W and C matter.

    Returns:
      A nested dict of arrays with collections ``params`` and ``batch_stats``.

    Example:
      >>> variables = init_variables(VGG(cfg=(4, "M"), num_classes=3), 0, (1, 8, 8, 3))
      >>> variables["params"]["conv0"]["kernel"].shape
      (3, 3, 3, 4)
    """
    variables = _init(jax.random.key(seed), model=model, input_shape=tuple(input_shape))
    return flax.core.unfreeze(variables)


@functools.partial(jax.jit, static_argnames=("model", "input_shape"))
def _init(key: jax.Array, *, model: nn.Module, input_shape: tuple[int, ...]) -> Any:
    return model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)
