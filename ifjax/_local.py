"""A group's own arrays under canonical names, so that compiled functions are shared.

The jit-compiled pruning functions take a group as a static argument and the arrays it
touches as their only inputs. Keyed by the model's paths, every group would compile its
own functions and a function taking the whole variable tree would copy (and compile a
copy of) every leaf it does not change. Here a group is relabelled: each module it
touches becomes ``m0``, ``m1``, ... in order of first appearance, keeping the collection
(``params``, ``batch_stats``) and the leaf name (``kernel``, ``var``, ...). Groups of the
same structure then have equal canonical groups, so those whose arrays have equal shapes
(e.g. VGG's conv5 -> conv6 and conv6 -> conv7) share one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from ifjax._graph import BatchNormRef, Group, Writer
from ifjax._tree import Path, tree_get, tree_replace

__all__ = ["LocalGroup", "localize"]


def _group_paths(group: Group) -> Iterator[Path]:
    """Every variable path the group names, in a fixed order (duplicates included)."""
    for w in group.writers:
        yield w.kernel
        if w.bias is not None:
            yield w.bias
        if w.batchnorm is not None:
            bn = w.batchnorm
            yield from (p for p in (bn.scale, bn.bias, bn.mean, bn.var) if p is not None)
    for r in group.readers:
        yield r.kernel
    for path, _ in group.channel_params:
        yield path


def tree_from_paths(leaves: Mapping[Path, Any]) -> dict[str, Any]:
    """A nested dict holding ``leaves`` at their paths."""
    tree: dict[str, Any] = {}
    for path, leaf in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


@dataclasses.dataclass(frozen=True)
class LocalGroup:
    """A group relabelled with canonical paths.

    Attributes:
      group: the group with canonical paths (and index 0): equal for groups of equal
        structure, hashable, a static argument of the compiled functions.
      paths: (original path, canonical path) of every variable the group names.
    """

    group: Group
    paths: tuple[tuple[Path, Path], ...]

    def gather(self, variables: Mapping[str, Any], kernels_only: bool = False) -> dict[str, Any]:
        """The group's arrays of ``variables`` as a small tree with canonical paths.

        ``kernels_only``: only the writers' and readers' kernels (e.g. of a gradients
        tree, which has no BatchNorm statistics).
        """
        wanted = None
        if kernels_only:
            wanted = {w.kernel for w in self.group.writers} | {r.kernel for r in self.group.readers}
        return tree_from_paths(
            {
                canonical: tree_get(variables, original)
                for original, canonical in self.paths
                if wanted is None or canonical in wanted
            }
        )

    def scatter(self, variables: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
        """``variables`` with the group's arrays replaced by those of ``local``."""
        return tree_replace(
            variables,
            {original: tree_get(local, canonical) for original, canonical in self.paths},
        )


@functools.cache
def localize(group: Group) -> LocalGroup:
    """Relabels a group's paths canonically (see the module docstring); the group's
    segments must be resolved (:func:`~ifjax._graph.resolve_segments`)."""
    modules: dict[Path, str] = {}
    canonical: dict[Path, Path] = {}
    for path in _group_paths(group):
        if path not in canonical:
            module = modules.setdefault(path[1:-1], f"m{len(modules)}")
            canonical[path] = (path[0], module, path[-1])

    def rename(path: Path | None) -> Path | None:
        return None if path is None else canonical[path]

    def writer(w: Writer) -> Writer:
        bn = w.batchnorm
        if bn is not None:
            bn = BatchNormRef(rename(bn.scale), rename(bn.bias), rename(bn.mean), rename(bn.var))
        return dataclasses.replace(w, kernel=rename(w.kernel), bias=rename(w.bias), batchnorm=bn)

    local = Group(
        index=0,
        size=group.size,
        writers=tuple(writer(w) for w in group.writers),
        readers=tuple(dataclasses.replace(r, kernel=rename(r.kernel)) for r in group.readers),
        channel_params=tuple((rename(p), axis) for p, axis in group.channel_params),
        kind=group.kind,
        partitions=group.partitions,
        segments=tuple((rename(p), b) for p, b in group.segments if p in canonical),
    )
    return LocalGroup(local, tuple(canonical.items()))
