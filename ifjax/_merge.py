"""Applying transport maps to the weights of a group: the one merge of pruning and fusion.

:func:`apply_maps` applies an (m, n) map to every slice of a group's channels: writers'
kernels, biases and the bias of the BatchNorm after them with a writer map, readers'
input columns with a reader map, and the group's other per-channel variables by a rule
of the caller. Pruning (:func:`merge_group`, :func:`merge_group_masked`) slices those to
the kept channels; fusion (:func:`transport_group`) maps them too, BatchNorm statistics
as the moments of a mixture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ifjax._graph import Group, Reader, Writer, resolve_segments
from ifjax._tree import Path, tree_get, tree_replace

__all__ = [
    "apply_maps",
    "masked_maps",
    "merge_group",
    "merge_group_masked",
    "select_kernel_channels",
    "transport_group",
]

# the value a masked (pruned but kept in place) per-channel variable gets
_MASKED_FILL = {"var": 1.0}

# ``rule(path, value, axis) -> new value`` of a per-channel variable
ChannelRule = Callable[[Path, jnp.ndarray, int], jnp.ndarray]


def _on_segment(x, axis: int, outer: int, inner: int, start: int, n: int, fn):
    """``fn`` applied to the n channels from ``start`` of axis ``axis`` of ``x`` (laid
    out as outer, total, inner: a concatenation), the other segments left as they are;
    ``fn`` of ``x`` itself when the axis holds exactly those n channels."""
    total = x.shape[axis] // (outer * inner)
    if total == n:
        return fn(x)
    moved = jnp.moveaxis(x, axis, 0)
    rest = moved.shape[1:]
    blocks = moved.reshape((outer, total, inner) + rest)
    segment = jnp.moveaxis(blocks[:, start : start + n].reshape((-1,) + rest), 0, axis)
    new = jnp.moveaxis(fn(segment), axis, 0).reshape((outer, -1, inner) + rest)
    joined = jnp.concatenate([blocks[:, :start], new, blocks[:, start + n :]], axis=1)
    return jnp.moveaxis(joined.reshape((-1,) + rest), 0, axis)


def _apply_grouped(matrix: jnp.ndarray, x: jnp.ndarray, reader: Reader) -> jnp.ndarray:
    """Applies a block-diagonal ``matrix`` (m, n) (one block per convolution group) to
    the input axis of a grouped convolution's kernel ``x``: block g maps the input rows
    of output block g."""
    g = reader.groups
    m, n = matrix.shape
    k = jnp.moveaxis(x, (reader.axis, reader.output_axis), (0, 1))
    per_block, out = k.shape[:2]
    k = k.reshape((per_block, g, out // g) + k.shape[2:])
    index = jnp.arange(g)
    diagonal = matrix.reshape(g, m // g, g, n // g)[index, :, index, :]  # (g, m/g, n/g)
    merged = jnp.einsum("gki,igo...->kgo...", diagonal, k)
    merged = merged.reshape((m // g, out) + merged.shape[3:])
    return jnp.moveaxis(merged, (0, 1), (reader.axis, reader.output_axis))


def apply_to_layer(
    matrix: jnp.ndarray, x: jnp.ndarray, group: Group, layer: Writer | Reader
) -> jnp.ndarray:
    """Applies ``matrix`` (m, n) to the group's channels in a writer's or reader's
    kernel ``x`` (a resolved group: see :func:`~ifjax._graph.resolve_segments`)."""
    if isinstance(layer, Reader) and layer.groups > 1:
        return _apply_grouped(matrix, x, layer)
    start = group.start(layer.kernel) if isinstance(layer, Reader) else 0
    return _on_segment(
        x,
        layer.axis,
        layer.outer,
        layer.inner,
        start,
        matrix.shape[1],
        lambda segment: _apply_axis(matrix, segment, layer.axis, layer.outer, layer.inner),
    )


def _apply_axis(matrix: jnp.ndarray, x: jnp.ndarray, axis: int, outer: int = 1, inner: int = 1):
    """Applies ``matrix`` (m, n) to axis ``axis`` of ``x`` (laid out as outer, n, inner)."""
    if x.ndim == 4 and outer * inner == 1:
        # Convolution kernels: one (everything else, n) x (n, m) product, the product XLA
        # makes of the einsum below too (same results), but with two or more of them in
        # one function XLA:CPU compiles this form in ~0.15 s instead of ~1 s.
        moved = jnp.moveaxis(x, axis, -1)
        merged = moved.reshape(-1, moved.shape[-1]) @ matrix.T
        return jnp.moveaxis(merged.reshape(moved.shape[:-1] + (matrix.shape[0],)), -1, axis)
    moved = jnp.moveaxis(x, axis, 0)
    rest = moved.shape[1:]
    n = moved.shape[0] // (outer * inner)
    blocks = moved.reshape((outer, n, inner) + rest)
    merged = jnp.einsum("kj,ojs...->oks...", matrix, blocks)
    merged = merged.reshape((outer * matrix.shape[0] * inner,) + rest)
    return jnp.moveaxis(merged, 0, axis)


def apply_maps(
    variables: Mapping[str, Any],
    group: Group,
    writer_map: jnp.ndarray,
    reader_map: jnp.ndarray,
    rule: ChannelRule,
    query_key_map: jnp.ndarray | None = None,
) -> dict[str, Any]:
    """Applies (m, n) maps to every slice of a group's channels.

    Writers' kernels (output axis), their biases and the biases of the BatchNorms after
    them are combined with ``writer_map``; readers' kernels (input axis, laid out as
    ``outer, n, inner``) with ``reader_map``; every other per-channel variable of the
    group (BatchNorm scale, mean, var, ...) becomes ``rule(path, value, axis)``.

    Args:
      variables: a variables tree holding the group's arrays.
      group: the group (its paths name arrays of ``variables``).
      writer_map: (m, n), row k the weights of the n channels that make channel k.
      reader_map: (m, n), likewise for the readers' input columns.
      rule: the new value of each other per-channel variable.
      query_key_map: (m, n), for attention heads: the map of the query and key writers
        (role ``"query_key"``) instead of ``writer_map``.

    Returns:
      ``variables`` with the group's arrays replaced (m channels); the input is unchanged.
    """
    group = resolve_segments(variables, group)
    updates: dict[Path, jnp.ndarray] = {}
    merged_vectors: set[Path] = set()
    for w in group.writers:
        matrix = writer_map
        if query_key_map is not None and w.role == "query_key":
            matrix = query_key_map
        updates[w.kernel] = apply_to_layer(matrix, tree_get(variables, w.kernel), group, w)
        for path in filter(None, (w.bias, w.batchnorm.bias if w.batchnorm else None)):
            updates[path] = _apply_axis(matrix, tree_get(variables, path), 0, w.outer, w.inner)
            merged_vectors.add(path)
    for r in group.readers:  # (a layer can read what it writes: x + conv(x))
        kernel = updates.get(r.kernel, tree_get(variables, r.kernel))
        updates[r.kernel] = apply_to_layer(reader_map, kernel, group, r)
    n = writer_map.shape[1]
    for path, axis in group.channel_params:
        if path not in merged_vectors:
            value = tree_get(variables, path)
            start = group.start(path)
            updates[path] = _on_segment(
                value, axis, 1, 1, start, n, lambda v, p=path, a=axis: rule(p, v, a)
            )
    return tree_replace(variables, updates)


def masked_maps(
    writer_map: jnp.ndarray, reader_map: jnp.ndarray, keep: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The (m, n) maps of a plan as (n, n) maps for the masked form, and the keep mask.

    Row ``keep[i]`` of each (n, n) map is row i of the (m, n) map, the other rows are
    zero: applied to a layer, it puts the merged slices at the kept positions and zeros
    elsewhere. Its shapes no longer depend on m, so neither does the masked merge.
    """
    n = writer_map.shape[1]
    expand = lambda matrix: jnp.zeros((n, n), matrix.dtype).at[keep].set(matrix)
    return expand(writer_map), expand(reader_map), jnp.zeros((n,), bool).at[keep].set(True)


def merge_group_masked(
    variables: Mapping[str, Any],
    group: Group,
    writer_map: jnp.ndarray,
    reader_map: jnp.ndarray,
    kept: jnp.ndarray,
    query_key_map: jnp.ndarray | None = None,
) -> dict[str, Any]:
    """The masked form of :func:`merge_group` from the (n, n) maps and (n,) mask of
    :func:`masked_maps`: shapes unchanged, pruned per-channel variables set to 0 (1 for
    BatchNorm's var)."""

    def select(path, value, axis):
        mask = kept.reshape(kept.shape + (1,) * (value.ndim - axis - 1))
        return jnp.where(mask, value, _MASKED_FILL.get(path[-1], 0.0))

    return apply_maps(variables, group, writer_map, reader_map, select, query_key_map)


def merge_group(
    variables: Mapping[str, Any],
    group: Group,
    writer_map: jnp.ndarray,
    reader_map: jnp.ndarray,
    keep: jnp.ndarray,
    *,
    masked: bool = False,
    query_key_map: jnp.ndarray | None = None,
) -> dict[str, Any]:
    """Applies a pruning plan's (m, n) maps to every layer of a group.

    Writers (kernel output rows, their bias and the bias of the BatchNorm after them)
    are combined with ``writer_map``; readers' input columns with ``reader_map``; other
    per-channel variables (BatchNorm scale/mean/var) are sliced to ``keep``;
    ``query_key_map``: see :func:`apply_maps`. With ``masked=True`` shapes are
    unchanged: merged slices sit at the kept positions and pruned ones are zero
    (BatchNorm var 1), which computes the same function.
    """
    if masked:
        writer_n, reader_n, kept = masked_maps(writer_map, reader_map, keep)
        if query_key_map is not None:
            query_key_map = masked_maps(query_key_map, query_key_map, keep)[0]
        return merge_group_masked(variables, group, writer_n, reader_n, kept, query_key_map)
    select = lambda path, value, axis: jnp.take(value, keep, axis=axis)
    return apply_maps(variables, group, writer_map, reader_map, select, query_key_map)


def transport_group(
    variables: Mapping[str, Any], group: Group, transport: jnp.ndarray
) -> dict[str, Any]:
    """Applies one (m, n) map to every slice of a group, BatchNorm statistics as moments.

    Kernels, biases and every per-channel variable mix linearly with ``transport``,
    except a BatchNorm variance (a ``batch_stats`` ``var`` next to a ``mean``), which
    becomes the variance of the mixture, ``T var + max(T mean^2 - (T mean)^2, 0)``:
    exactly ``var`` permuted when ``T`` is a permutation.
    """
    params = dict(group.channel_params)
    group = resolve_segments(variables, group)
    n = transport.shape[1]

    def mix(path, value, axis):
        mixed = _apply_axis(transport, value, axis)
        mean_path = path[:-1] + ("mean",)
        if path[0] == "batch_stats" and path[-1] == "var" and mean_path in params:
            mean = tree_get(variables, mean_path)
            if mean.shape[axis] != n:  # the group's segment of a concatenation
                mean = jax.lax.dynamic_slice_in_dim(mean, group.start(mean_path), n, axis)
            spread = _apply_axis(transport, mean**2, axis) - _apply_axis(transport, mean, axis) ** 2
            mixed = mixed + jnp.maximum(spread, 0.0)
        return mixed

    return apply_maps(variables, group, transport, transport, mix)


def select_kernel_channels(
    tree: Mapping[str, Any], group: Group, keep: jnp.ndarray
) -> dict[str, Any]:
    """The group's kernels of ``tree`` (e.g. a gradients tree, which has no BatchNorm
    statistics) sliced to the kept channels ``keep`` (m,)."""
    group = resolve_segments(tree, group)
    updates = {}
    n = None
    for layer in (*group.writers, *group.readers):
        kernel = tree_get(tree, layer.kernel)
        if n is None:  # the first writer holds exactly the group's channels
            n = kernel.shape[layer.axis] // (layer.outer * layer.inner)
        if layer.outer * layer.inner == 1 and not (isinstance(layer, Reader) and layer.groups > 1):
            start = group.start(layer.kernel) if isinstance(layer, Reader) else 0
            take = lambda x, a=layer.axis: jnp.take(x, keep, axis=a)
            updates[layer.kernel] = _on_segment(kernel, layer.axis, 1, 1, start, n, take)
            continue
        selection = jax.nn.one_hot(keep, n, dtype=kernel.dtype)
        updates[layer.kernel] = apply_to_layer(selection, kernel, group, layer)
    return tree_replace(tree, updates)
