"""Input checks that turn bad input into a ValueError naming the problem."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ifjax._graph import Group, path_str
from ifjax._tree import shapes_of, tree_get, tree_paths

__all__ = ["check_group", "check_sparsity", "check_variables_finite", "check_variables_match"]


def check_sparsity(sparsity: Any) -> None:
    """Sparsity must be a real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0 <= float(sparsity) < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def _shape(variables: Mapping[str, Any], path, group: Group) -> tuple[int, ...]:
    try:
        return tuple(np.shape(tree_get(variables, path)))
    except KeyError as missing:
        raise ValueError(
            f"group {group.index} does not belong to these variables: no {missing.args[0]!r} "
            "(was it discovered on another model?)"
        ) from None


def check_group(variables: Mapping[str, Any], group: Group) -> None:
    """All of the group's slices exist and agree on the channel count."""
    if not isinstance(group, Group):
        raise ValueError(f"expected a Group from discover_groups, got {type(group).__name__}")
    sizes = {}
    segmented = {path for path, _ in group.segments}  # concatenations: at least n
    for layer in (*group.writers, *group.readers):
        shape = _shape(variables, layer.kernel, group)
        if layer.kernel not in segmented:
            sizes[path_str(layer.kernel)] = (
                shape[layer.axis] * getattr(layer, "groups", 1) // (layer.outer * layer.inner)
            )
    for path, axis in group.channel_params:
        shape = _shape(variables, path, group)
        if path not in segmented:
            sizes[path_str(path)] = shape[axis]
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"group {group.index} does not match these variables: channel counts {sizes} differ "
            "(was it discovered on another model?)"
        )


def check_variables_finite(variables: Mapping[str, Any]) -> None:
    """Every leaf is finite (no NaN or inf)."""
    for path, leaf in tree_paths(variables).items():
        if isinstance(leaf, jax.core.Tracer):
            return
        value = np.asarray(leaf)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            bad = "NaN" if np.isnan(value).any() else "inf"
            raise ValueError(f"variable {path_str(path)} contains {bad} values")


def check_variables_match(model: Any, variables: Mapping[str, Any], example_input: Any) -> None:
    """The variables have exactly the structure and shapes the model expects."""
    expected = jax.eval_shape(model.init, jax.random.key(0), example_input)
    want = shapes_of(expected)
    got = shapes_of(variables)
    missing = [path_str(p) for p in want if p not in got]
    extra = [path_str(p) for p in got if p not in want]
    wrong = [f"{path_str(p)} {got[p]} != {want[p]}" for p in want if p in got and got[p] != want[p]]
    if missing or extra or wrong:
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {extra[:3]}" if extra else "",
        ]
        parts.append(f"shape mismatch {wrong[:3]}" if wrong else "")
        raise ValueError(
            f"variables do not match {type(model).__name__}: " + "; ".join(p for p in parts if p)
        )
