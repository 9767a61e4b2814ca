"""Folding BatchNorm into the convolution or Dense layer before it (paper Eq. 1)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifjax._graph import Group, Writer
from ifjax._model import as_variables, is_nnx
from ifjax._tree import Path, tree_get, tree_replace

__all__ = ["fold_batchnorm", "recalibrate_batchnorm"]


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


# ----------------------------------------------------------------------------- recalibration


def _images(batch: Any) -> Any:
    return batch["image"] if isinstance(batch, Mapping) else batch


def _weighted_sum(total: Any, stats: Any, weight: int) -> Any:
    """``total + weight * stats`` leaf by leaf (``total`` None: nothing summed yet)."""
    if total is None:
        return jax.tree.map(lambda b: weight * b, stats)
    return jax.tree.map(lambda a, b: a + weight * b, total, stats)


@functools.partial(jax.jit, static_argnames=("model", "kwargs", "axis_name"))
def _train_mode_batch_stats(others, prev, x, *, model, kwargs, axis_name) -> Any:
    """The ``batch_stats`` a Linen model's train-mode pass over ``x`` leaves, from ``prev``
    (jit-compiled once per model, kwargs and shapes: models of equal widths share it)."""

    def run(x):
        variables = {**others, "batch_stats": prev}
        _, state = model.apply(variables, x, mutable=["batch_stats"], **dict(kwargs))
        return state["batch_stats"]

    if axis_name is None:
        return run(x)
    return jax.tree.map(lambda a: a[0], jax.vmap(run, axis_name=axis_name)(x[None]))


def _linen_recalibrated(model, variables, batches, kwargs, axis_name) -> dict[str, Any]:
    """Linen: a BatchNorm in train mode updates ``ra = m * ra + (1 - m) * batch``, with a
    momentum ``m`` the module keeps to itself. Run from ``ra = 0`` it returns
    ``(1 - m) * batch``, from ``ra = 1`` ``m + (1 - m) * batch``: the difference is ``m``,
    so every layer's batch statistics come out exactly, whatever its momentum."""
    others = {k: v for k, v in variables.items() if k != "batch_stats"}
    static = tuple(sorted(kwargs.items()))
    try:
        hash((model, static))
    except TypeError:  # unhashable module fields or kwargs: compiled for this call only
        step = jax.jit(functools.partial(_train_mode_batch_stats.__wrapped__, model=model,
                                         kwargs=static, axis_name=axis_name))  # fmt: skip
    else:
        step = functools.partial(
            _train_mode_batch_stats, model=model, kwargs=static, axis_name=axis_name
        )
    updated = functools.partial(step, others)

    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    ones = jax.tree.map(jnp.ones_like, variables["batch_stats"])
    total, count, momentum = None, 0, None
    for batch in batches:
        x = _images(batch)
        from_zero = updated(zeros, x)
        if momentum is None:
            momentum = jax.tree.map(lambda a, b: a - b, updated(ones, x), from_zero)
            flat = jax.tree_util.tree_flatten_with_path(momentum)[0]
            for path, m in flat:
                if not np.all(np.asarray(m) < 1 - 1e-6):
                    where = "/".join(str(getattr(k, "key", k)) for k in path)
                    raise ValueError(
                        f"batch_stats {where!r} does not move towards the batch's statistics "
                        "in training mode (momentum 1?); check apply_kwargs (e.g. train=True)"
                    )
        stats = jax.tree.map(lambda s, m: s / (1 - m), from_zero, momentum)
        size = int(np.shape(x)[0])
        total, count = _weighted_sum(total, stats, size), count + size
    if count == 0:
        raise ValueError("recalibrate_batchnorm needs at least one batch")
    averaged = jax.tree.map(lambda t: t / count, total)
    return {**variables, "batch_stats": averaged}


def _nnx_recalibrated(module, batches, kwargs) -> Any:
    from flax import nnx

    copy = nnx.clone(module)
    norms = [m for _, m in nnx.iter_modules(copy) if isinstance(m, nnx.BatchNorm)]
    if not norms:
        raise ValueError("the NNX module has no nnx.BatchNorm to recalibrate")
    copy.train()
    graphdef, state = nnx.split(copy)

    @jax.jit
    def batch_stats(state: Any, x: Any) -> Any:
        net = nnx.merge(graphdef, state)
        for norm in [m for _, m in nnx.iter_modules(net) if isinstance(m, nnx.BatchNorm)]:
            # variable[...]: flax's array access (current flax deprecates ``.value``)
            norm.mean[...] = jnp.zeros_like(norm.mean[...])
            norm.var[...] = jnp.zeros_like(norm.var[...])
        net(x, **kwargs)
        return [
            (norm.mean[...] / (1 - norm.momentum), norm.var[...] / (1 - norm.momentum))
            for norm in [m for _, m in nnx.iter_modules(net) if isinstance(m, nnx.BatchNorm)]
        ]

    total, count = None, 0
    for batch in batches:
        x = _images(batch)
        size = int(np.shape(x)[0])
        total, count = _weighted_sum(total, batch_stats(state, x), size), count + size
    if count == 0:
        raise ValueError("recalibrate_batchnorm needs at least one batch")
    for norm, (mean, var) in zip(norms, total, strict=True):
        norm.mean[...], norm.var[...] = mean / count, var / count
    copy.eval()
    return copy


def recalibrate_batchnorm(
    model: Any,
    *args: Any,
    apply_kwargs: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    axis_name: str | None = None,
) -> Any:
    """Re-estimates every BatchNorm's running statistics from data, without gradients.

    After pruning, merging or fusing models, the stored means and variances no longer
    describe the layers' inputs; a few hundred images set them right. Each batch runs
    through the model in training mode (BatchNorm normalises with the batch's statistics,
    as in training); the new running mean and variance of every BatchNorm are the
    averages of its batches' means and (biased) variances, weighted by batch size, exactly
    as PyTorch's cumulative recalibration (``momentum=None``) computes them, whatever the
    layers' own momentum. Parameters are not touched; the inputs are never modified.

    Linen: ``recalibrate_batchnorm(model, variables, batches, apply_kwargs={"train":
    True})`` returns new variables. NNX: ``recalibrate_batchnorm(module, batches)``
    returns a new module (in evaluation mode) whose ``nnx.BatchNorm`` statistics are new.

    Args:
      model: a Linen module or an NNX module.
      *args: Linen: ``variables, batches``; NNX: ``batches``. ``batches`` is an iterable
        of input arrays or of dicts with an ``"image"`` array.
      apply_kwargs: Linen: keyword arguments that put the model in training mode
        (default ``{"train": True}``).
      call_kwargs: NNX: keyword arguments of the module's call.
      axis_name: Linen: the BatchNorms' ``axis_name`` (e.g. ``"batch"`` in flax's
        examples ResNet), bound here for the batches run on one device.

    Returns:
      New variables (Linen) or a new module (NNX).

    Example:
      >>> batches = [train_images[i : i + 128] for i in range(0, 512, 128)]
      >>> variables = ifjax.recalibrate_batchnorm(model, pruned_variables, batches)
    """
    if is_nnx(model):
        if apply_kwargs is not None or axis_name is not None or len(args) != 1:
            raise ValueError("an NNX module takes (module, batches) and call_kwargs")
        return _nnx_recalibrated(model, args[0], dict(call_kwargs or {}))
    if call_kwargs is not None or len(args) != 2:
        raise ValueError("a Linen module takes (model, variables, batches) and apply_kwargs")
    variables, batches = args
    if "batch_stats" not in variables:
        raise ValueError(f"the variables have no batch_stats collection: {sorted(variables)}")
    kwargs = {"train": True} if apply_kwargs is None else dict(apply_kwargs)
    return _linen_recalibrated(model, variables, batches, kwargs, axis_name)
