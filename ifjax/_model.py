"""A model seen as pure functions of a variables tree: Linen and NNX alike.

Everything in ifjax works on a variables tree ``{"params": ..., "batch_stats": ...}`` and
a pure ``apply(variables, x)``. :func:`model_view` gives both for a Linen module (its
variables and ``model.apply(variables, x, **apply_kwargs)``) and for an NNX module (its
``nnx.Param`` and ``nnx.BatchStat`` arrays under ``params`` and ``batch_stats``, with
string keys, and a function that merges them into a copy of the module's graph and calls
it with ``call_kwargs``). It also records modules' outputs (for OTFusion) and builds the
model of new (e.g. pruned) variables: ``for_variables`` where a model has it, else
:mod:`ifjax._widths`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from ifjax._tree import Path, tree_get
from ifjax._widths import pruned_linen_module, set_nnx_widths

__all__ = [
    "ModelView",
    "as_variables",
    "is_nnx",
    "model_for",
    "model_view",
    "variables_of",
    "view_and_input",
]

_COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


def is_nnx(model: Any) -> bool:
    return isinstance(model, nnx.Module)


@dataclasses.dataclass(frozen=True)
class ModelView:
    """A model as pure functions of its variables.

    Attributes:
      model: the user's module (Linen or NNX), never modified.
      variables: its variables tree.
      apply: ``apply(variables, x) -> output``, pure.
      capture: ``capture(variables, x, modules) -> {module path: output}``.
      rebuild: ``rebuild(variables) -> model`` running with those variables' widths (for
        NNX, a new module holding them).
      kind: "linen" or "nnx".
    """

    model: Any
    variables: dict[str, Any]
    apply: Callable[[Any, Any], Any]
    capture: Callable[[Any, Any, tuple[Path, ...]], dict[Path, jnp.ndarray]]
    rebuild: Callable[[Any], Any]
    kind: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def describe(self) -> str:
        """How the model is called, for error messages."""
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs)
        name = type(self.model).__name__
        return f"{name}.apply(variables, x{extra})" if self.kind == "linen" else f"{name}(x{extra})"


def model_view(
    model: Any, variables: Mapping[str, Any] | None = None, kwargs: Mapping[str, Any] | None = None
) -> ModelView:
    """The :class:`ModelView` of a Linen module and its variables, or of an NNX module.

    Args:
      model: a Linen module (``variables`` needed) or an NNX module (``variables`` None).
      variables: the Linen module's variables.
      kwargs: extra call arguments (Linen's ``apply_kwargs``, NNX's ``call_kwargs``).
    """
    kwargs = dict(kwargs or {})
    if is_nnx(model):
        if variables is not None:
            raise ValueError("an NNX module holds its variables; do not pass variables too")
        return _nnx_view(model, kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a Flax Linen or NNX module, got {type(model).__name__}")
    if not isinstance(variables, Mapping):
        raise ValueError(
            f"a Linen module needs its variables (a mapping), got {type(variables).__name__}"
        )
    return _linen_view(model, dict(variables), kwargs)


def view_and_input(
    model: Any,
    args: tuple,
    apply_kwargs: Mapping[str, Any] | None,
    call_kwargs: Mapping[str, Any] | None,
) -> tuple[ModelView, Any]:
    """``(view, example_input)`` from ``(model, variables, x)`` (Linen) or ``(module, x)``
    (NNX), the calling conventions of the public functions."""
    if is_nnx(model):
        if apply_kwargs is not None:
            raise ValueError("apply_kwargs is for Linen modules; NNX modules take call_kwargs")
        if len(args) != 1:
            raise ValueError(
                f"an NNX module takes (module, example_input), got {len(args) + 1} arguments"
            )
        return model_view(model, None, call_kwargs), args[0]
    if call_kwargs is not None:
        raise ValueError("call_kwargs is for NNX modules; Linen modules take apply_kwargs")
    if len(args) != 2:
        raise ValueError(
            f"a Linen module takes (model, variables, example_input), got {len(args) + 1} arguments"
        )
    return model_view(model, args[0], apply_kwargs), args[1]


def _items(kwargs: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kwargs.items()))


# ----------------------------------------------------------------------------- Linen


def _linen_view(model: nn.Module, variables: dict[str, Any], kwargs: dict) -> ModelView:
    def apply(v, x):
        return model.apply(v, x, **kwargs)

    def capture(v, x, modules):
        wanted = set(modules)
        _, state = model.apply(
            v,
            x,
            capture_intermediates=lambda mdl, name: name == "__call__" and mdl.path in wanted,
            mutable=["intermediates"],
            **kwargs,
        )
        return {m: tree_get(state, ("intermediates",) + m + ("__call__",))[0] for m in modules}

    def rebuild(v):
        if hasattr(model, "for_variables"):
            return model.for_variables(v)
        return pruned_linen_module(model, v, variables)

    return ModelView(model, variables, apply, capture, rebuild, "linen", _items(kwargs))


# ----------------------------------------------------------------------------- NNX


def _training_layers(module: nnx.Module) -> list[str]:
    found = []
    for path, sub in nnx.iter_modules(module):
        for flag in ("use_running_average", "deterministic"):
            if getattr(sub, flag, None) is False:
                where = "/".join(map(str, path)) or "the module"
                found.append(f"{type(sub).__name__} {where!r} has {flag}=False")
    return found


def _plain_path(path) -> tuple[Any, ...]:
    keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


def _nnx_view(module: nnx.Module, kwargs: dict) -> ModelView:
    training = _training_layers(module)
    if training:
        raise ValueError(
            "the NNX module is in training mode (" + "; ".join(training[:3]) + "): pruning "
            "traces and evaluates it, so call module.eval() first (module.train() after)"
        )
    graphdef, *states, rest = nnx.split(module, *(t for _, t in _COLLECTIONS), ...)
    layouts, variables = [], {}
    for (name, _), state in zip(_COLLECTIONS, states, strict=True):
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        paths = [tuple(map(str, _plain_path(p))) for p, _ in flat]
        layouts.append((name, treedef, paths))
        tree: dict[str, Any] = {}
        for path, (_, leaf) in zip(paths, flat, strict=True):
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = leaf
        if tree:
            variables[name] = tree

    def merged(v) -> nnx.Module:
        states = [
            treedef.unflatten([tree_get(v, (name,) + p) for p in paths])
            for name, treedef, paths in layouts
        ]
        return nnx.merge(graphdef, *states, rest)

    def apply(v, x):
        return merged(v)(x, **kwargs)

    def capture(v, x, modules):
        forward = nnx.capture(merged(v), nnx.Intermediate, method_outputs=nnx.Intermediate)
        _, intermediates = forward(x, **kwargs)
        found = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(intermediates))[0]:
            keys = tuple(map(str, _plain_path(path)))
            if len(keys) >= 2 and keys[-2] == "__call__":
                found.setdefault(keys[:-2], leaf)
        missing = [m for m in modules if m not in found]
        if missing:
            raise ValueError(f"no output was recorded for modules {missing[:3]}")
        return {m: found[m] for m in modules}

    def rebuild(v):
        pruned = merged(v)
        set_nnx_widths(pruned)
        return pruned

    return ModelView(module, variables, apply, capture, rebuild, "nnx", _items(kwargs))


def as_variables(model_or_variables: Any) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """``(variables, give_back)`` for what the public functions accept in a variables
    tree's place: an NNX module gives its tree and ``give_back`` builds a new module from
    a result tree; a variables tree is returned as is, ``give_back`` the identity."""
    if is_nnx(model_or_variables):
        view = model_view(model_or_variables)
        return view.variables, view.rebuild
    return model_or_variables, lambda variables: variables


def model_for(model: Any, variables: Mapping[str, Any]) -> Any:
    """The model that runs with ``variables``, e.g. pruned ones restored from a checkpoint.

    Args:
      model: the (dense) Linen module the variables came from, or an NNX module of the
        same architecture (used as a template; not modified).
      variables: a variables tree in ifjax's layout (``params`` / ``batch_stats``; for
        NNX the paths of :func:`ifjax.discover_groups`), dense or pruned.

    Returns:
      Linen: ``model.for_variables(variables)`` where the model has it, else the module
      running with the variables' widths (as :func:`ifjax.prune` returns it). NNX: a new
      module holding ``variables``, its width attributes set from them.

    Example:
      >>> variables, info = ifjax.checkpoint.restore_model("runs/pruned")
      >>> small = ifjax.model_for(MyModel(), variables)
      >>> logits = small.apply(variables, x, train=False)
    """
    if is_nnx(model):
        return model_view(model).rebuild(variables)
    return model_view(model, variables).rebuild(variables)


def variables_of(module: nnx.Module) -> dict[str, Any]:
    """The variables tree ifjax sees for an NNX module (``params`` from ``nnx.Param``,
    ``batch_stats`` from ``nnx.BatchStat``, string keys), e.g. to save a pruned module with
    :func:`ifjax.checkpoint.save_model` and rebuild it with :func:`model_for`."""
    if not is_nnx(module):
        raise ValueError(f"variables_of expects an NNX module, got {type(module).__name__}")
    return model_view(module).variables
