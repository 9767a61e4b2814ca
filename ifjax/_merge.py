"""Merging a transport map into the weights of a group (physically or masked)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ifjax._graph import Group
from ifjax._tree import Path, tree_get, tree_replace

__all__ = ["merge_group"]

# the value a masked (pruned but kept in place) per-channel variable gets
_MASKED_FILL = {"var": 1.0}


def _apply_axis(matrix: jnp.ndarray, x: jnp.ndarray, axis: int, outer: int = 1, inner: int = 1):
    """Applies ``matrix`` (m, n) to axis ``axis`` of ``x`` (laid out as outer, n, inner)."""
    moved = jnp.moveaxis(x, axis, 0)
    rest = moved.shape[1:]
    n = moved.shape[0] // (outer * inner)
    blocks = moved.reshape((outer, n, inner) + rest)
    merged = jnp.einsum("kj,ojs...->oks...", matrix, blocks)
    merged = merged.reshape((outer * matrix.shape[0] * inner,) + rest)
    return jnp.moveaxis(merged, 0, axis)


def _place(merged: jnp.ndarray, like: jnp.ndarray, keep: jnp.ndarray, axis: int, outer=1, inner=1):
    """Masked form: put the m merged slices back at the kept positions, zeros elsewhere."""
    n = like.shape[axis] // (outer * inner)
    scatter = jnp.zeros((n, keep.shape[0]), like.dtype).at[keep, jnp.arange(keep.shape[0])].set(1)
    return _apply_axis(scatter, merged, axis, outer, inner)


def merge_group(
    variables: Mapping[str, Any],
    group: Group,
    writer_map: jnp.ndarray,
    reader_map: jnp.ndarray,
    keep: jnp.ndarray,
    *,
    masked: bool = False,
) -> dict[str, Any]:
    """Applies (m, n) maps to every layer of a group.

    Writers (kernel output rows, their bias and the bias of the BatchNorm after them)
    are combined with ``writer_map``; readers' input columns with ``reader_map``; other
    per-channel variables (BatchNorm scale/mean/var) are sliced to ``keep``. With
    ``masked=True`` shapes are unchanged: merged slices sit at the kept positions and
    pruned ones are zero (BatchNorm var 1), which computes the same function.
    """
    updates: dict[Path, jnp.ndarray] = {}

    def put(path, merged, axis, outer=1, inner=1):
        original = tree_get(variables, path)
        updates[path] = _place(merged, original, keep, axis, outer, inner) if masked else merged

    merged_vectors: set[Path] = set()
    for w in group.writers:
        put(w.kernel, _apply_axis(writer_map, tree_get(variables, w.kernel), w.axis), w.axis)
        biases = [w.bias, w.batchnorm.bias if w.batchnorm else None]
        for path in filter(None, biases):
            put(path, writer_map @ tree_get(variables, path), 0)
            merged_vectors.add(path)
    for r in group.readers:
        kernel = tree_get(variables, r.kernel)
        put(
            r.kernel,
            _apply_axis(reader_map, kernel, r.axis, r.outer, r.inner),
            r.axis,
            r.outer,
            r.inner,
        )
    for path, axis in group.channel_params:
        if path in merged_vectors:
            continue
        value = tree_get(variables, path)
        if masked:
            mask = jnp.zeros(value.shape[axis], bool).at[keep].set(True)
            fill = _MASKED_FILL.get(path[-1], 0.0)
            updates[path] = jnp.where(mask, value, fill)
        else:
            updates[path] = jnp.take(value, keep, axis=axis)
    return tree_replace(variables, updates)
