"""Per-channel views of the layers of a group: the slices the paper's features use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ifjax._graph import Group, Reader, Writer, resolve_segments
from ifjax._tree import tree_get


def _rows(
    kernel: jnp.ndarray,
    axis: int,
    outer: int,
    inner: int,
    start: int = 0,
    size: int | None = None,
) -> jnp.ndarray:
    """``kernel`` as (n, everything else), its ``axis`` laid out as (outer, total, inner)
    and the channels those ``start ... start + size`` of the total (all by default)."""
    kernel = jnp.moveaxis(kernel, axis, 0)
    rest = kernel.shape[1:]
    total = kernel.shape[0] // (outer * inner)
    kernel = kernel.reshape((outer, total, inner) + rest)
    if size is not None and size != total:  # a segment of a concatenation
        kernel = kernel[:, start : start + size]
    return jnp.moveaxis(kernel, 1, 0).reshape(kernel.shape[1], -1)


def _grouped_rows(kernel: jnp.ndarray, reader: Reader) -> jnp.ndarray:
    """A grouped convolution's kernel as (input channels, everything else): input
    channel ``g * per_block + i`` is read by input row i of output block g."""
    kernel = jnp.moveaxis(kernel, (reader.axis, reader.output_axis), (0, 1))
    per_block, out = kernel.shape[:2]
    kernel = kernel.reshape((per_block, reader.groups, out // reader.groups) + kernel.shape[2:])
    return jnp.swapaxes(kernel, 0, 1).reshape(reader.groups * per_block, -1)


def writer_rows(variables: Mapping[str, Any], writer: Writer) -> jnp.ndarray:
    """The writer's kernel as (n, everything else): row j produces channel j (for heads:
    every weight of head j)."""
    return _rows(tree_get(variables, writer.kernel), writer.axis, writer.outer, writer.inner)


def reader_rows(
    variables: Mapping[str, Any], reader: Reader, size: int, start: int = 0
) -> jnp.ndarray:
    """The reader's kernel as (n, everything else): row j consumes channel j (of a
    concatenation: channel ``start + j`` of its input axis)."""
    kernel = tree_get(variables, reader.kernel)
    if reader.groups > 1:
        return _grouped_rows(kernel, reader)
    return _rows(kernel, reader.axis, reader.outer, reader.inner, start, size)


def group_reader_rows(variables: Mapping[str, Any], group: Group, size: int) -> list[jnp.ndarray]:
    """:func:`reader_rows` of every reader of the group (resolved, see
    :func:`~ifjax._graph.resolve_segments`)."""
    return [reader_rows(variables, r, size, group.start(r.kernel)) for r in group.readers]


def group_size(variables: Mapping[str, Any], group: Group) -> int:
    """The group's current channel count, read from its first writer."""
    w = group.writers[0]
    return int(tree_get(variables, w.kernel).shape[w.axis]) // (w.outer * w.inner)


def channel_features(variables: Mapping[str, Any], group: Group) -> jnp.ndarray:
    """Feature vector of every channel, (n, D): writers' output rows, then readers' input
    columns (biases are not included, as in the reference)."""
    group = resolve_segments(variables, group)
    n = group_size(variables, group)
    rows = [writer_rows(variables, w) for w in group.writers]
    rows += group_reader_rows(variables, group, n)
    return jnp.concatenate(rows, axis=1)
