"""Giving a model the widths of its pruned variables: any Linen module, any NNX module.

Pruning changes array shapes only; the user's module still declares its dense widths
(``nn.Conv(64, ...)``, ``nnx.Linear(512, 10)``). How the pruned model runs anyway:

* **Linen.** A Linen layer creates its parameters from its attributes and checks the
  shapes of existing ones against them (``ScopeParamShapeError``), so the attributes must
  say the pruned widths while the layer runs. :func:`pruned_linen_module` returns an
  instance of a subclass of the user's class (``isinstance`` holds, every field is kept)
  whose ``apply``, ``init``, ``init_with_output`` and ``__call__`` run inside
  ``nn.intercept_methods``: just before a submodule's method runs, the interceptor looks
  up the shapes of that submodule's parameters in the pruned variables (a static table
  keyed by module path, relative to the pruned module) and sets the width attributes they
  imply (``features`` of ``nn.Conv`` / ``nn.Dense``, ...) on the bound clone Flax made for
  this call. The user's module and its submodule definitions are never touched. Input
  widths are inferred from inputs by every Flax layer, so only output widths are set.
  This was chosen over re-running the traced program with new shapes because it keeps the
  user's module whole: ``train=True`` with ``mutable=["batch_stats"]``, named axes,
  dropout ``rngs``, ``jax.jit``/``grad``/``vmap`` and their own train step work unchanged,
  and ``init`` gives the pruned shapes. Layers of other kinds get a rule with
  :func:`register_width_rule`; any layer with an integer ``features`` attribute and a
  ``kernel`` is covered already. A module whose widths no rule explains is found when
  ``prune`` checks ``init``'s shapes against the pruned variables, and is named there.
* **NNX.** Modules hold their arrays, so the pruned arrays are merged into a copy of the
  module graph (``nnx.merge``) and the width attributes (``in_features``,
  ``out_features``, ``num_features``, ``kernel_shape``, ...) are set from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
from flax import nnx

from ifjax._tree import Path, tree_paths

__all__ = ["pruned_linen_module", "register_width_rule", "set_nnx_widths"]

Shapes = Mapping[str, tuple[int, ...]]
WidthRule = Callable[[Any, Shapes], dict[str, Any]]


def _features(module: Any, shapes: Shapes) -> dict[str, Any]:
    return {"features": shapes["kernel"][-1]} if "kernel" in shapes else {}


def _conv(module: nn.Conv, shapes: Shapes) -> dict[str, Any]:
    """``features``; a depthwise convolution (as many groups as output channels: one per
    input channel) keeps one group per channel. A grouped one keeps its group count
    (pruning keeps equal numbers of channels per group)."""
    widths = _features(module, shapes)
    groups = module.feature_group_count
    if widths and groups > 1 and groups == module.features:
        widths["feature_group_count"] = widths["features"]
    return widths


def _dense_general(module: nn.DenseGeneral, shapes: Shapes) -> dict[str, Any]:
    if "kernel" not in shapes:
        return {}
    if isinstance(module.features, int):
        return {"features": shapes["kernel"][-1]}
    return {"features": tuple(shapes["kernel"][-len(module.features) :])}


def _embed(module: nn.Embed, shapes: Shapes) -> dict[str, Any]:
    rows, features = shapes["embedding"]
    return {"num_embeddings": rows, "features": features}


def _einsum(module: nn.Einsum, shapes: Shapes) -> dict[str, Any]:
    return {"shape": tuple(shapes["kernel"])}


def _attention(module: nn.MultiHeadDotProductAttention, shapes: Shapes) -> dict[str, Any]:
    if "query/kernel" not in shapes:
        return {}
    _, heads, head_dim = shapes["query/kernel"]
    widths = {"num_heads": heads, "qkv_features": heads * head_dim}
    if module.out_features is not None and "out/kernel" in shapes:
        widths["out_features"] = shapes["out/kernel"][-1]
    return widths


_LINEN_RULES: dict[type, WidthRule] = {
    nn.Dense: _features,
    nn.Conv: _conv,
    nn.ConvTranspose: _features,
    nn.ConvLocal: _features,
    nn.DenseGeneral: _dense_general,
    nn.Embed: _embed,
    nn.Einsum: _einsum,
    nn.MultiHeadDotProductAttention: _attention,
}


def register_width_rule(module_type: type, rule: WidthRule) -> None:
    """Teaches ifjax the width attributes of a Linen layer type (and its subclasses).

    Args:
      module_type: a Linen module class.
      rule: ``rule(module, shapes) -> {attribute: value}``, where ``shapes`` maps the
        layer's parameter names to their (pruned) shapes, its submodules' parameters
        included under their relative names (``"q/kernel"``).

    Example:
      >>> register_width_rule(MyLinear, lambda m, s: {"out_dim": s["w"][-1]})
      >>> register_width_rule(  # an attention layer that reshapes into num_heads heads
      ...     MyAttention, lambda m, s: {"num_heads": s["q/kernel"][-1] // m.head_dim})
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"register_width_rule expects a Linen module class, got {module_type!r}")
    _LINEN_RULES[module_type] = rule


def _linen_rule(module: Any) -> WidthRule | None:
    for cls in type(module).__mro__:
        if cls in _LINEN_RULES:
            return _LINEN_RULES[cls]
    if isinstance(getattr(module, "features", None), int):
        return _features
    return None


def _block_features(module: Any, shapes: Shapes, dense: Shapes) -> dict[str, Any]:
    """A block without a kernel of its own whose ``features`` is the output width of
    the kernels in it that had that width (an inverted residual block's ``features``,
    compared with its input width to decide on the residual connection): their pruned
    width, when they agree."""
    features = getattr(module, "features", None)
    if isinstance(features, bool) or not isinstance(features, int) or "kernel" in shapes:
        return {}
    widths = {
        shapes[name][-1]
        for name, shape in dense.items()
        if name.split("/")[-1] == "kernel" and shape[-1] == features and name in shapes
    }
    return {"features": widths.pop()} if len(widths) == 1 else {}


def _group_norm(module: nn.GroupNorm, dense: Shapes) -> dict[str, Any]:
    """A GroupNorm given by ``group_size`` keeps its number of norm groups (pruning keeps
    equal numbers of channels in each), so it is given by that number instead."""
    if module.group_size is None or "scale" not in dense:
        return {}
    return {"num_groups": dense["scale"][-1] // module.group_size, "group_size": None}


def _set_widths(module: Any, shapes: Shapes, dense: Shapes) -> None:
    rule = _linen_rule(module)
    widths = {} if rule is None else rule(module, shapes)
    if isinstance(module, nn.GroupNorm):
        widths = _group_norm(module, dense)
    if not widths:
        widths = _block_features(module, shapes, dense)
    for name, value in widths.items():
        if getattr(module, name) != value:
            object.__setattr__(module, name, value)  # the bound clone of this call only


def _param_shapes(variables: Mapping[str, Any]) -> dict[Path, dict[str, tuple[int, ...]]]:
    """{module path: {parameter name: shape}} of the ``params`` collection; a module's
    names include those of its submodules' parameters relative to it (``"q/kernel"``),
    so that layers holding no parameter of their own (an attention layer whose heads
    count is an attribute) can have rules too."""
    table: dict[Path, dict[str, tuple[int, ...]]] = {}
    for path, leaf in tree_paths(variables.get("params", {})).items():
        shape = tuple(getattr(leaf, "shape", ()))
        for cut in range(len(path)):
            table.setdefault(path[:cut], {})["/".join(path[cut:])] = shape
    return table


@contextlib.contextmanager
def _widths_of(module: Any, prefix: tuple[str, ...]):
    table, dense = type(module)._ifjax_widths, type(module)._ifjax_dense

    def interceptor(next_fun, args, kwargs, context):
        if context.module.scope is None:  # not bound (e.g. init itself)
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if path[: len(prefix)] == prefix and path[len(prefix) :] in table:
            relative = path[len(prefix) :]
            _set_widths(context.module, table[relative], dense.get(relative, {}))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _unbound_wrapper(name: str):
    def method(self, *args, **kwargs):
        with _widths_of(self, ()):
            return getattr(super(type(self), self), name)(*args, **kwargs)

    method.__name__ = name
    return method


def _call(self, *args, **kwargs):
    prefix = tuple(self.path)
    if () in type(self)._ifjax_widths:
        _set_widths(self, type(self)._ifjax_widths[()], type(self)._ifjax_dense.get((), {}))
    with _widths_of(self, prefix):
        return super(type(self), self).__call__(*args, **kwargs)


def pruned_linen_module(
    model: nn.Module, variables: Mapping[str, Any], dense: Mapping[str, Any] | None = None
) -> nn.Module:
    """The user's Linen module, running with the widths of ``variables`` (see above).

    Args:
      model: any Linen module (not modified).
      variables: pruned variables of it.
      dense: the variables ``model`` declares (default ``variables``): blocks whose
        ``features`` names the width of kernels inside them are found from these.

    Returns:
      An instance of a subclass of ``type(model)`` with the same fields.
    """
    base = getattr(type(model), "_ifjax_base", type(model))
    declared = getattr(type(model), "_ifjax_dense", None)
    if declared is None:
        declared = _param_shapes(variables if dense is None else dense)
    namespace = {
        "_ifjax_base": base,
        "_ifjax_widths": _param_shapes(variables),
        "_ifjax_dense": declared,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        **{name: _unbound_wrapper(name) for name in ("apply", "init", "init_with_output")},
    }
    if any("__call__" in vars(c) for c in base.__mro__ if c not in (nn.Module, object)):
        namespace["__call__"] = _call
    cls = type(base.__name__, (base,), namespace)
    pruned = model.clone()
    object.__setattr__(pruned, "__class__", cls)
    return pruned


# ----------------------------------------------------------------------------- NNX


def _nnx_shape(module: Any, name: str) -> tuple[int, ...] | None:
    value = getattr(module, name, None)
    return tuple(value.shape) if isinstance(value, nnx.Variable) else None


def _nnx_linear(module: nnx.Linear) -> dict[str, Any]:
    kernel = _nnx_shape(module, "kernel")
    return {"in_features": kernel[0], "out_features": kernel[1]}


def _nnx_conv(module: nnx.Conv) -> dict[str, Any]:
    kernel = _nnx_shape(module, "kernel")
    groups = module.feature_group_count
    if groups > 1 and groups == module.in_features == module.out_features:  # depthwise
        groups = kernel[-1]
    return {
        "in_features": kernel[-2] * groups,
        "out_features": kernel[-1],
        "kernel_shape": kernel,
        "feature_group_count": groups,
    }


def _nnx_norm(module: Any) -> dict[str, Any]:
    shapes = (_nnx_shape(module, name) for name in ("scale", "bias", "mean"))
    shape = next((s for s in shapes if s), None)
    return {} if shape is None else {"num_features": shape[-1]}


def _nnx_linear_general(module: nnx.LinearGeneral) -> dict[str, Any]:
    kernel = _nnx_shape(module, "kernel")
    n_in = len(module.in_features)
    out = kernel[n_in:]
    return {
        "in_features": kernel[:n_in],
        "out_features": out if isinstance(module.out_features, tuple) else out[0],
    }


def _nnx_attention(module: nnx.MultiHeadAttention) -> dict[str, Any]:
    in_features, heads, head_dim = _nnx_shape(module.query, "kernel")
    kv_in, kv_heads, _ = _nnx_shape(module.key, "kernel")
    return {
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "qkv_features": heads * head_dim,
        "in_features": in_features,
        "in_kv_features": kv_in,
        "out_features": _nnx_shape(module.out, "kernel")[-1],
    }


def _nnx_embed(module: nnx.Embed) -> dict[str, Any]:
    rows, features = _nnx_shape(module, "embedding")
    return {"num_embeddings": rows, "features": features}


_NNX_RULES: dict[type, Callable[[Any], dict[str, Any]]] = {
    nnx.Linear: _nnx_linear,
    nnx.Conv: _nnx_conv,
    nnx.ConvTranspose: _nnx_conv,
    nnx.BatchNorm: _nnx_norm,
    nnx.LayerNorm: _nnx_norm,
    nnx.RMSNorm: _nnx_norm,
    nnx.GroupNorm: _nnx_norm,
    nnx.Embed: _nnx_embed,
    nnx.LinearGeneral: _nnx_linear_general,
    nnx.MultiHeadAttention: _nnx_attention,
}


def set_nnx_widths(module: nnx.Module) -> None:
    """Sets the width attributes of every layer of a module (built by ifjax) from its
    arrays."""
    for _, sub in nnx.iter_modules(module):
        rule = next((_NNX_RULES[c] for c in type(sub).__mro__ if c in _NNX_RULES), None)
        if rule is None:
            continue
        for name, value in rule(sub).items():
            if hasattr(sub, name) and getattr(sub, name) != value:
                setattr(sub, name, value)
