"""Folding BatchNorm into the convolution or Dense layer before it (paper Eq. 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifjax._graph import Group, Writer
from ifjax._model import as_variables
from ifjax._tree import Path, tree_get, tree_replace

__all__ = ["fold_batchnorm"]


def _broadcast(vector: jnp.ndarray, ndim: int, axis: int) -> jnp.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def _fold_writer(get, writer: Writer, xp: Any) -> dict[Path, Any]:
    """The folded arrays of one layer; ``get(path)`` reads an array, ``xp`` is numpy or
    jax.numpy."""
    bn = writer.batchnorm
    mean, var = get(bn.mean), get(bn.var)
    gamma = get(bn.scale) if bn.scale else xp.ones_like(mean)
    beta = get(bn.bias) if bn.bias else xp.zeros_like(mean)
    factor = gamma / xp.sqrt(var)  # the reference folds without BatchNorm's epsilon
    kernel = get(writer.kernel)
    updates = {writer.kernel: kernel * _broadcast(factor, kernel.ndim, writer.axis)}
    bias = get(writer.bias) if writer.bias else xp.zeros_like(mean)
    folded_bias = (bias - mean) * factor + beta
    if writer.bias:
        updates[writer.bias] = folded_bias
        folded_bias = xp.zeros_like(mean)
    updates[bn.mean] = xp.zeros_like(mean)
    updates[bn.var] = xp.ones_like(var)
    if bn.scale:
        updates[bn.scale] = xp.ones_like(gamma)
    if bn.bias:
        updates[bn.bias] = folded_bias
    elif writer.bias is None:
        raise ValueError(
            f"cannot fold {'/'.join(bn.module)}: neither the layer nor the BatchNorm has a bias"
        )
    return updates


def fold_batchnorm(variables: Mapping[str, Any] | Any, groups: Sequence[Group]) -> Any:
    """Folds every BatchNorm that directly follows a layer of the groups into that layer.

    Per output channel: ``w' = w * gamma / sqrt(var)`` and
    ``b' = (b - mean) * gamma / sqrt(var) + beta``, without BatchNorm's epsilon, exactly
    as the reference. The BatchNorm becomes the identity (mean 0, var 1, scale 1, bias 0)
    but keeps its epsilon, so outputs change by about 1e-6 relative. A layer without a
    bias keeps the folded bias in the BatchNorm's bias instead.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}``, or an NNX module; not modified.
      groups: from :func:`discover_groups`.

    Returns:
      New variables, same structure and shapes (for an NNX module: a new module).

    Example:
      >>> groups = discover_groups(model, variables, x)
      >>> folded = fold_batchnorm(variables, groups)
    """
    variables, give_back = as_variables(variables)
    writers = [w for group in groups for w in group.writers if w.batchnorm is not None]
    get = lambda path: tree_get(variables, path)
    leaves = jax.tree.leaves(variables)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        xp = jnp  # traced (e.g. under jit): part of the caller's computation
    else:
        # numpy on the host. Eager jax.numpy compiles every operation and shape on its
        # own (26 compilations for VGG11-BN); jit-compiled as one function, XLA rewrites
        # them into rsqrt and multiply-adds, which change the last bit. numpy rounds each
        # operation as eager XLA does, and compiles nothing.
        xp, get = np, lambda path: np.asarray(tree_get(variables, path))
    updates: dict[Path, Any] = {}
    for writer in writers:
        updates.update(_fold_writer(get, writer, xp))
    if xp is np:
        updates = {path: _placed_like(v, tree_get(variables, path)) for path, v in updates.items()}
    return give_back(tree_replace(variables, updates))


def _placed_like(value: np.ndarray, original: Any) -> jax.Array:
    """``value`` as a JAX array (``device_put``: ``jnp.asarray`` would compile a copy per
    shape), sharded like ``original`` if that spans several devices."""
    sharding = None
    if isinstance(original, jax.Array) and len(original.sharding.device_set) > 1:
        sharding = original.sharding
    return jax.device_put(value, sharding)
