"""Reading and replacing leaves of nested variable dicts by path, without mutation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


def tree_get(tree: Mapping[str, Any], path: Path) -> Any:
    """The leaf at ``path``; KeyError names the missing path."""
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError("/".join(path[: i + 1]))
        node = node[key]
    return node


def tree_replace(tree: Mapping[str, Any], updates: Mapping[Path, Any]) -> dict[str, Any]:
    """A copy of ``tree`` (plain dicts) with the leaves at the given paths replaced.

    Only the dicts along updated paths are copied; the input is never modified.
    """
    by_head: dict[str, dict[Path, Any]] = {}
    for path, value in updates.items():
        by_head.setdefault(path[0], {})[path[1:]] = value
    out = dict(tree)
    for head, sub in by_head.items():
        if () in sub:
            out[head] = sub[()]
        else:
            out[head] = tree_replace(tree[head], sub)
    return out


def tree_paths(tree: Mapping[str, Any]) -> dict[Path, Any]:
    """{path: leaf} for every leaf of a nested mapping."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(getattr(k, "key", k)) for k in p): leaf for p, leaf in flat}


def shapes_of(tree: Mapping[str, Any]) -> dict[Path, tuple[int, ...]]:
    return {p: tuple(np.shape(x)) for p, x in tree_paths(tree).items()}
