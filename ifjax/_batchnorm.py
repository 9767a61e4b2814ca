"""Folding BatchNorm into the convolution or Dense layer before it (paper Eq. 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from ifjax._graph import Group, Writer
from ifjax._tree import Path, tree_get, tree_replace

__all__ = ["fold_batchnorm"]


def _broadcast(vector: jnp.ndarray, ndim: int, axis: int) -> jnp.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def _fold_writer(variables: Mapping[str, Any], writer: Writer) -> dict[Path, jnp.ndarray]:
    bn = writer.batchnorm
    mean, var = tree_get(variables, bn.mean), tree_get(variables, bn.var)
    gamma = tree_get(variables, bn.scale) if bn.scale else jnp.ones_like(mean)
    beta = tree_get(variables, bn.bias) if bn.bias else jnp.zeros_like(mean)
    factor = gamma / jnp.sqrt(var)  # the reference folds without BatchNorm's epsilon
    kernel = tree_get(variables, writer.kernel)
    updates = {writer.kernel: kernel * _broadcast(factor, kernel.ndim, writer.axis)}
    bias = tree_get(variables, writer.bias) if writer.bias else jnp.zeros_like(mean)
    folded_bias = (bias - mean) * factor + beta
    if writer.bias:
        updates[writer.bias] = folded_bias
        folded_bias = jnp.zeros_like(mean)
    updates[bn.mean] = jnp.zeros_like(mean)
    updates[bn.var] = jnp.ones_like(var)
    if bn.scale:
        updates[bn.scale] = jnp.ones_like(gamma)
    if bn.bias:
        updates[bn.bias] = folded_bias
    elif writer.bias is None:
        raise ValueError(
            f"cannot fold {'/'.join(bn.module)}: neither the layer nor the BatchNorm has a bias"
        )
    return updates


def fold_batchnorm(variables: Mapping[str, Any], groups: Sequence[Group]) -> dict[str, Any]:
    """Folds every BatchNorm that directly follows a layer of the groups into that layer.

    Per output channel: ``w' = w * gamma / sqrt(var)`` and
    ``b' = (b - mean) * gamma / sqrt(var) + beta``, without BatchNorm's epsilon, exactly
    as the reference. The BatchNorm becomes the identity (mean 0, var 1, scale 1, bias 0)
    but keeps its epsilon, so outputs change by about 1e-6 relative. A layer without a
    bias keeps the folded bias in the BatchNorm's bias instead.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}``; not modified.
      groups: from :func:`discover_groups`.

    Returns:
      New variables, same structure and shapes.

    Example:
      >>> groups = discover_groups(model, variables, x)
      >>> folded = fold_batchnorm(variables, groups)
    """
    updates: dict[Path, jnp.ndarray] = {}
    for group in groups:
        for writer in group.writers:
            if writer.batchnorm is not None:
                updates.update(_fold_writer(variables, writer))
    return tree_replace(variables, updates)
