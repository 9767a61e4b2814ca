"""Per-channel views of the layers of a group: the slices the paper's features use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ifjax._graph import Group, Reader, Writer
from ifjax._tree import tree_get


def _rows(kernel: jnp.ndarray, axis: int, outer: int, inner: int) -> jnp.ndarray:
    """``kernel`` as (n, everything else), its ``axis`` laid out as (outer, n, inner)."""
    kernel = jnp.moveaxis(kernel, axis, 0)
    rest = kernel.shape[1:]
    size = kernel.shape[0] // (outer * inner)
    kernel = kernel.reshape((outer, size, inner) + rest)
    return jnp.moveaxis(kernel, 1, 0).reshape(size, -1)


def writer_rows(variables: Mapping[str, Any], writer: Writer) -> jnp.ndarray:
    """The writer's kernel as (n, everything else): row j produces channel j (for heads:
    every weight of head j)."""
    return _rows(tree_get(variables, writer.kernel), writer.axis, writer.outer, writer.inner)


def reader_rows(variables: Mapping[str, Any], reader: Reader, size: int) -> jnp.ndarray:
    """The reader's kernel as (n, everything else): row j consumes channel j."""
    rows = _rows(tree_get(variables, reader.kernel), reader.axis, reader.outer, reader.inner)
    return rows.reshape(size, -1)


def group_size(variables: Mapping[str, Any], group: Group) -> int:
    """The group's current channel count, read from its first writer."""
    w = group.writers[0]
    return int(tree_get(variables, w.kernel).shape[w.axis]) // (w.outer * w.inner)


def channel_features(variables: Mapping[str, Any], group: Group) -> jnp.ndarray:
    """Feature vector of every channel, (n, D): writers' output rows, then readers' input
    columns (biases are not included, as in the reference)."""
    n = group_size(variables, group)
    rows = [writer_rows(variables, w) for w in group.writers]
    rows += [reader_rows(variables, r, n) for r in group.readers]
    return jnp.concatenate(rows, axis=1)
