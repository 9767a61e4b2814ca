"""Per-channel views of the layers of a group: the slices the paper's features use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ifjax._graph import Group, Reader, Writer
from ifjax._tree import tree_get


def writer_rows(variables: Mapping[str, Any], writer: Writer) -> jnp.ndarray:
    """The writer's kernel as (n, everything else): row j produces channel j."""
    kernel = jnp.moveaxis(tree_get(variables, writer.kernel), writer.axis, 0)
    return kernel.reshape(kernel.shape[0], -1)


def reader_rows(variables: Mapping[str, Any], reader: Reader, size: int) -> jnp.ndarray:
    """The reader's kernel as (n, everything else): row j consumes channel j."""
    kernel = jnp.moveaxis(tree_get(variables, reader.kernel), reader.axis, 0)
    rest = kernel.shape[1:]
    kernel = kernel.reshape((reader.outer, size, reader.inner) + rest)
    return jnp.moveaxis(kernel, 1, 0).reshape(size, -1)


def group_size(variables: Mapping[str, Any], group: Group) -> int:
    """The group's current channel count, read from its first writer."""
    writer = group.writers[0]
    return int(tree_get(variables, writer.kernel).shape[writer.axis])


def channel_features(variables: Mapping[str, Any], group: Group) -> jnp.ndarray:
    """Feature vector of every channel, (n, D): writers' output rows, then readers' input
    columns (biases are not included, as in the reference)."""
    n = group_size(variables, group)
    rows = [writer_rows(variables, w) for w in group.writers]
    rows += [reader_rows(variables, r, n) for r in group.readers]
    return jnp.concatenate(rows, axis=1)
