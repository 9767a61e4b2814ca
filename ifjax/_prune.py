"""Default pruning and Intra-Fusion as pure, jit-compiled plan/apply pairs.

A :class:`Pruner` is built by a factory (:func:`intra_fusion`, :func:`default_pruning`)
that closes over its hyperparameters, like an optax transformation:
``plan(variables, group) -> PrunePlan`` computes importance, keep set and transport map;
``apply(variables, group, plan) -> variables`` merges the map into the weights. Plans are
plain data (arrays) and can be inspected, saved, or applied to stacked replicas.

The transport problem (:class:`ifjax.TransportProblem`), its solver and map come from
``ifjax._transport`` and the maps are merged by ``ifjax._merge``: the pieces model
fusion (``ifjax._fusion``) uses too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ifjax._batchnorm import fold_batchnorm
from ifjax._channels import channel_features, group_size
from ifjax._graph import GROUP_KINDS, GraphError, Group, resolve_segments, view_groups
from ifjax._importance import IMPORTANCES, group_importance
from ifjax._local import localize
from ifjax._merge import masked_maps, merge_group, merge_group_masked, select_kernel_channels
from ifjax._model import ModelView, as_variables, is_nnx, view_and_input
from ifjax._transport import (
    Solver,
    TransportProblem,
    l1_cost,
    make_solver,
    marginals,
    normalize_rows,
    source_marginal,
    transport_map,
    transport_problem,
)
from ifjax._tree import shapes_of
from ifjax._validate import check_group, check_sparsity, check_variables_finite

__all__ = [
    "PrunePlan",
    "Pruner",
    "default_pruning",
    "intra_fusion",
    "keep_count",
    "prune",
]

METHODS = ("intra_fusion", "default")
MAP_NORMALIZATIONS = ("reference", "row_average")


def keep_count(size: int, sparsity: float) -> int:
    """Channels kept at a sparsity: ``int(n * (1 - s))`` (truncation, as the reference)."""
    check_sparsity(sparsity)
    m = int(size * (1 - sparsity))
    if m < 1:
        raise ValueError(f"sparsity {sparsity} leaves no channel of a group of {size}")
    return m


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """What pruning one group does, as arrays.

    Attributes:
      keep: (m,) kept channel indices, ascending.
      importance: (n,) importance scores (normalized).
      writer_map: (m, n) map applied to writing layers' output rows.
      reader_map: (m, n) map applied to reading layers' input columns.
      converged: whether the transport solver converged (True for exact/default).
      marginal_error: the solver's final marginal error.
    """

    keep: jnp.ndarray
    importance: jnp.ndarray
    writer_map: jnp.ndarray
    reader_map: jnp.ndarray
    converged: jnp.ndarray
    marginal_error: jnp.ndarray


def _kmeans(features: jnp.ndarray, init: jnp.ndarray, steps: int = 50) -> jnp.ndarray:
    """Lloyd iterations from ``init`` (m, D); empty clusters keep their centroid."""

    def step(centroids, _):
        d = jnp.sum((features[:, None, :] - centroids[None]) ** 2, -1)
        onehot = jax.nn.one_hot(jnp.argmin(d, 1), centroids.shape[0], dtype=features.dtype)
        counts = onehot.sum(0)[:, None]
        means = onehot.T @ features / jnp.where(counts > 0, counts, 1)
        return jnp.where(counts > 0, means, centroids), None

    return jax.lax.scan(step, init, None, length=steps)[0]


@functools.partial(jax.jit, static_argnames=("group", "importance", "marginal"))
def _scores(variables, group: Group, importance: str, marginal: str | None, gradients, key, scores):
    """What does not depend on the sparsity: importance, and for Intra-Fusion
    (``marginal`` given) the channel features and the source marginal. ``variables``
    holds the group's arrays only (see ``ifjax._local``).

    The source marginal is computed here, with the importance it divides, and the
    features are normalized in :func:`_problem`, with the cost they enter: XLA then
    simplifies and fuses them as it did when everything was one compiled function, so
    the results stay the same to the bit.
    """
    if scores is None:
        scores = group_importance(variables, group, importance, gradients=gradients, key=key)
    if marginal is None:
        return scores, None, None
    return scores, channel_features(variables, group), source_marginal(marginal, scores)


class _GroupProblem(NamedTuple):
    """What pruning one group at m channels solves: the keep set (m,), the importance
    (n,) and, for Intra-Fusion, the transport problem from the n channels to m targets."""

    keep: jnp.ndarray
    scores: jnp.ndarray
    transport: TransportProblem | None


@functools.partial(jax.jit, static_argnames=("m", "marginal", "target", "blocks"))
def _problem(
    scores, features, a, m: int, marginal: str | None, target: str, blocks: int = 1
) -> _GroupProblem:
    """Keep set and (for Intra-Fusion) the transport problem (cost, marginals) of one
    group at m channels. With ``blocks`` > 1 (see :class:`ifjax.Partition`) every block
    keeps its ``m / blocks`` most important channels and its channels are transported
    onto its own kept ones only: one problem per block, stacked, each block's masses
    rescaled to sum to one (the map, mass received over mass sent, is unchanged)."""
    n = scores.shape[0]
    if blocks == 1:
        keep = jnp.sort(jnp.argsort(scores, stable=True)[n - m :])
    else:
        per, kept = n // blocks, m // blocks
        order = jnp.argsort(scores.reshape(blocks, per), axis=1, stable=True)[:, per - kept :]
        keep = jnp.sort(order + per * jnp.arange(blocks)[:, None], axis=1).reshape(m)
    if marginal is None:
        return _GroupProblem(keep, scores, None)
    features = normalize_rows(features)
    targets = features[keep]
    _, b = marginals(marginal, scores, keep)
    if blocks == 1:
        if target == "centroids":
            targets = _kmeans(features, targets)
        return _GroupProblem(keep, scores, transport_problem(l1_cost(features, targets), a, b))
    split = lambda x: x.reshape((blocks, -1) + x.shape[1:])
    features, targets = split(features), split(targets)
    if target == "centroids":
        targets = jax.vmap(_kmeans)(features, targets)
    a, b = split(a), split(b)
    problem = TransportProblem(
        jax.vmap(l1_cost)(features, targets),
        a / jnp.sum(a, axis=1, keepdims=True),
        b / jnp.sum(b, axis=1, keepdims=True),
    )
    return _GroupProblem(keep, scores, problem)


@dataclasses.dataclass(frozen=True)
class _Solving:
    """The settings :func:`_solve` depends on (so pruners differing otherwise share it)."""

    method: str
    solver: Solver | None
    map_normalization: str


def _solve(config: _Solving, problem: _GroupProblem) -> PrunePlan:
    """Transport plan -> maps. Pure; vmapped over same-sized problems by plan_groups."""
    keep, scores, transport = problem
    if config.method == "default":
        selection = jax.nn.one_hot(keep, scores.shape[0], dtype=jnp.float32)
        return PrunePlan(keep, scores, selection, selection, jnp.array(True), jnp.array(0.0))
    if transport.cost.ndim == 3:  # one problem per block: a block-diagonal map
        result = jax.vmap(lambda p: p.solve(config.solver))(transport)
        maps = jax.vmap(transport_map)(result.plan, transport.a)
        reader_map = jax.scipy.linalg.block_diag(*maps)
        result = dataclasses.replace(
            result,
            converged=jnp.all(result.converged),
            marginal_error=jnp.max(result.marginal_error),
        )
    else:
        result = transport.solve(config.solver)
        reader_map = transport_map(result.plan, transport.a)
    writer_map = reader_map
    if config.map_normalization == "row_average":
        writer_map = reader_map / jnp.sum(reader_map, axis=1, keepdims=True)
    return PrunePlan(keep, scores, writer_map, reader_map, result.converged, result.marginal_error)


_solve_one = jax.jit(_solve, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _solve_batch(config: _Solving, problems: tuple[_GroupProblem, ...]) -> list[PrunePlan]:
    """Same-sized problems stacked, solved by one vmapped :func:`_solve` and split into
    one plan each, in one compiled function (eagerly, stacking and indexing would compile
    an operation per array, shape and index)."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
    batch = jax.vmap(_solve, in_axes=(None, 0))(config, stacked)
    return [jax.tree.map(lambda x, j=j: x[j], batch) for j in range(len(problems))]


@functools.partial(jax.jit, static_argnames="group")
def _apply(variables, group: Group, writer_map, reader_map, keep, query_key_map):
    """Physical form, on the group's arrays only: compiled once per group structure,
    shapes and m (the results have m channels)."""
    return merge_group(variables, group, writer_map, reader_map, keep, query_key_map=query_key_map)


@functools.partial(jax.jit, static_argnames="group")
def _apply_masked(variables, group: Group, writer_map, reader_map, kept, query_key_map):
    """Masked form from (n, n) maps: compiled once per group structure and shapes,
    whatever the sparsity."""
    return merge_group_masked(variables, group, writer_map, reader_map, kept, query_key_map)


_masked_maps = jax.jit(masked_maps)

# How Intra-Fusion merges attention heads (see ``intra_fusion``).
HEAD_MERGES = ("average", "values", "map")


@jax.jit
def _row_average(reader_map: jnp.ndarray) -> jnp.ndarray:
    return reader_map / jnp.sum(reader_map, axis=1, keepdims=True)


def _head_plan(plan: PrunePlan, group: Group, head_merge: str) -> PrunePlan:
    """The writer map of a heads group under ``head_merge`` "average" or "values": the
    reader map with rows averaged (query, key and value weights of a merged head are
    transport-weighted means, its output projections summed)."""
    if group.kind != "heads" or head_merge == "map":
        return plan
    return dataclasses.replace(plan, writer_map=_row_average(plan.reader_map))


@dataclasses.dataclass(frozen=True)
class _Config:
    method: str
    sparsity: float | None
    importance: str
    marginals: str
    target: str
    solver: Solver | None
    map_normalization: str
    head_merge: str = "average"
    round_to: int = 1

    @property
    def solving(self) -> _Solving:
        return _Solving(self.method, self.solver, self.map_normalization)


class Pruner(NamedTuple):
    """A pair of pure functions (like an optax GradientTransformation).

    ``plan(variables, group, *, width=None, gradients=None, key=None, scores=None)
    -> PrunePlan`` (``width``: channels to keep, instead of the pruner's sparsity;
    ``scores``, (n,), replaces the importance metric when given) and
    ``apply(variables, group, plan, *, masked=False) -> variables``. ``variables`` may
    be an NNX module instead (``apply`` then returns a new module). Both are pure (the
    user may ``jax.jit`` or ``jax.vmap`` them over variables, ``group`` static), are
    jit-compiled inside and do not recompile for a repeated call with the same shapes. The
    compiled functions take only the arrays of the group, so groups of the same
    structure and shapes share them; a group's importance and features, and the masked
    ``apply``, compile once for every sparsity.
    ``plan_groups(variables, groups, ...) -> list[PrunePlan]`` plans several groups of
    the same variables independently, solving same-sized transport problems together
    in one vmapped call.
    """

    plan: Any
    apply: Any
    plan_groups: Any


def _what(group: Group, n: int) -> str:
    """``"group 4 (3 heads of block0/attention)"``: a group in error messages."""
    unit = {"heads": "heads", "neurons": "neurons"}.get(group.kind, "channels")
    where = f" of {group.layer}" if group.layer else ""
    return f"group {group.index} ({n} {unit}{where})"


def _kept(
    n: int, sparsity: float | None, width: int | None, group: Group, round_to: int = 1
) -> int:
    """Channels kept in a group of n: ``width`` if given, else from the sparsity
    (``int(n * (1 - s))``, the reference's truncation). With ``round_to`` k > 1, the
    multiple of k nearest ``n * (1 - s)``, at least k and less than n. A group in
    blocks (:attr:`Group.partitions`) keeps a multiple of its block count (rounded
    down, at least one per block)."""
    blocks = group.blocks
    unit = math.lcm(round_to, blocks)
    why = " and ".join(
        ([f"round_to={round_to}"] if round_to > 1 else [])
        + [p.describe() for p in group.partitions]
    )
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n:
            raise ValueError(
                f"{_what(group, n)}: width {width!r} is not in 1..{n} (pruning all of them is "
                "not possible)"
            )
        if width % unit:
            raise ValueError(
                f"{_what(group, n)}: width {width} is not a multiple of {unit}, as {why} requires"
            )
        return width
    if sparsity is None:
        raise ValueError(f"{_what(group, n)}: give a width, the pruner has no sparsity")
    check_sparsity(sparsity)
    m = int(n * (1 - sparsity))
    if round_to > 1:
        largest = (n - 1) // unit * unit  # never the whole group
        if largest < unit:
            raise ValueError(
                f"{_what(group, n)}: cannot keep a multiple of {unit} ({why}) that is neither "
                f"zero nor all {n}: round_to is too large for this group"
            )
        nearest = unit * math.floor(n * (1 - sparsity) / unit + 0.5)
        return min(max(nearest, unit), largest)
    if m < 1 and blocks == 1:
        raise ValueError(
            f"sparsity {sparsity} would prune every one of {_what(group, n)}; at least "
            "one must stay"
        )
    return max(m // blocks * blocks, blocks)


def _pruner(config: _Config) -> Pruner:
    def problem(variables, group, gradients, key, scores=None, width=None):
        check_group(variables, group)
        group = resolve_segments(variables, group)
        n = group_size(variables, group)
        m = _kept(n, config.sparsity, width, group, config.round_to)
        if scores is not None:
            scores = jnp.asarray(scores, jnp.float32)
            if scores.shape != (n,):
                raise ValueError(f"scores must have shape (n,) = ({n},)")
        elif key is None and config.importance == "random":
            raise ValueError("importance='random' needs a PRNG key")
        marginal = None if config.method == "default" else config.marginals
        features = a = None
        if scores is None or marginal is not None:
            # compiled per group structure and shapes, shared by every sparsity
            local = localize(group)
            if config.importance != "taylor" or gradients is None:
                gradients = None
            else:
                gradients = local.gather(gradients, kernels_only=True)
            key = key if config.importance == "random" else None
            scores, features, a = _scores(
                local.gather(variables),
                local.group,
                config.importance,
                marginal,
                gradients,
                key,
                scores,
            )
        return _problem(scores, features, a, m, marginal, config.target, group.blocks)

    def plan(variables, group, *, width=None, gradients=None, key=None, scores=None):
        variables, _ = as_variables(variables)
        solved = _solve_one(
            config.solving, problem(variables, group, gradients, key, scores, width)
        )
        return _head_plan(solved, group, config.head_merge)

    def plan_groups(variables, groups, *, widths=None, gradients=None, key=None):
        variables, _ = as_variables(variables)
        problems = []
        for i, group in enumerate(groups):
            group_key = None if key is None else jax.random.fold_in(key, i)
            width = None if widths is None else widths[i]
            problems.append(problem(variables, group, gradients, group_key, width=width))
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(problems):
            shape = None if p.transport is None else p.transport.cost.shape
            buckets.setdefault((p.scores.shape[0], p.keep.shape[0], shape), []).append(i)
        plans: list[Any] = [None] * len(problems)
        for members in buckets.values():
            solved = _solve_batch(config.solving, tuple(problems[i] for i in members))
            for i, plan in zip(members, solved, strict=True):
                plans[i] = _head_plan(plan, groups[i], config.head_merge)
        return plans

    def apply(variables, group, plan, *, masked=False):
        variables, give_back = as_variables(variables)
        check_group(variables, group)
        group = resolve_segments(variables, group)
        if masked and group.kind == "residual":
            raise ValueError(
                f"{_what(group, group.size)} is normalized by LayerNorm: its masked form "
                "(zeros in place) is not the pruned model, whose LayerNorm averages over "
                "fewer channels; prune it physically (masked=False)"
            )
        if masked and group.normalized_in_blocks:
            norms = ", ".join(p.layer for p in group.partitions if p.normalizes)
            raise ValueError(
                f"{_what(group, group.size)} is normalized by GroupNorm ({norms}): its masked "
                "form (zeros in place) is not the pruned model, whose norm groups average "
                "over fewer channels; prune it physically (masked=False)"
            )
        local = localize(group)
        arrays = local.gather(variables)
        query_key_map = None
        if group.kind == "heads" and config.head_merge == "values":
            # queries and keys of the kept heads unchanged: their attention patterns stay
            query_key_map = jax.nn.one_hot(plan.keep, plan.writer_map.shape[1])
        if masked:
            maps = _masked_maps(plan.writer_map, plan.reader_map, plan.keep)
            if query_key_map is not None:
                query_key_map = _masked_maps(query_key_map, query_key_map, plan.keep)[0]
            merged = _apply_masked(arrays, local.group, *maps, query_key_map)
        else:
            merged = _apply(
                arrays, local.group, plan.writer_map, plan.reader_map, plan.keep, query_key_map
            )
        return give_back(local.scatter(variables, merged))

    return Pruner(plan, apply, plan_groups)


def intra_fusion(
    sparsity: float | None,
    importance: str = "l1",
    *,
    marginals: str = "uniform",
    target: str = "most_important",
    solver: str | Solver = "exact",
    map_normalization: str = "reference",
    head_merge: str = "average",
    round_to: int = 1,
    epsilon: float = 1e-3,
    max_iterations: int = 5000,
    threshold: float = 1e-4,
) -> Pruner:
    """Intra-Fusion: pruned channels are merged into the kept ones by optimal transport.

    Args:
      sparsity: fraction of each group's channels to remove, in [0, 1); None when every
        ``plan`` call gives its ``width``.
      importance: see :func:`group_importance` ("l1", "l2", "lamp", "lamp_released",
        "taylor", "random").
      marginals: "uniform" (the paper's default) or "importance".
      target: "most_important" (the kept channels) or "centroids" (k-means of the
        normalized features, started from the kept channels).
      solver: "exact" (POT's network simplex, as the reference), "sinkhorn" (ott-jax),
        or any :class:`ifjax.Solver`, ``solver(cost, a, b) -> TransportResult`` (see
        :func:`ifjax.make_solver`).
      map_normalization: "reference" (writing rows are summed with the map's
        coefficients, as the released code) or "row_average" (writing rows are
        averaged: function-preserving for duplicate channels).
      head_merge: how attention heads (groups of kind "heads") merge. Each head is one
        point (its query, key and value kernels and its slice of the output
        projection), and the transport map says how much of each pruned head goes to
        each kept one. "average" (default): a kept head's query, key and value weights
        become the transport-weighted *mean* of the heads it receives and its output
        projection their *sum*. Queries and keys enter the attention logits as a
        product and values are mixed by softmax weights that sum to one, so summing
        them (the channel rule of the reference) would rescale the logits by the
        square of the received mass; averaging keeps their scale and merges duplicate
        heads exactly. "values": queries and keys of the kept heads are kept as they
        are (their attention patterns unchanged), only values (averaged) and output
        projections (summed) merge. "map": the writer map of every other group
        (``map_normalization``) for queries, keys and values too.
      round_to: keep a multiple of this many channels in every group (widths that suit
        accelerators: 8, 128): the multiple nearest ``n * (1 - sparsity)``, never zero
        and never the whole group.
      epsilon, max_iterations, threshold: Sinkhorn settings (epsilon relative to the
        mean cost).

    Example:
      >>> pruner = intra_fusion(0.5, "l1")
      >>> plan = pruner.plan(folded, groups[2])
      >>> pruned = pruner.apply(folded, groups[2], plan)
    """
    sparsity = _optional_sparsity(sparsity)
    _check_choice("importance", importance, IMPORTANCES)
    _check_choice("marginals", marginals, ("uniform", "importance"))
    _check_choice("target", target, ("most_important", "centroids"))
    _check_choice("map_normalization", map_normalization, MAP_NORMALIZATIONS)
    _check_choice("head_merge", head_merge, HEAD_MERGES)
    _check_round_to(round_to)
    config = _Config(
        "intra_fusion",
        sparsity,
        importance,
        marginals,
        target,
        make_solver(solver, epsilon=epsilon, max_iterations=max_iterations, threshold=threshold),
        map_normalization,
        head_merge,
        round_to,
    )
    return _pruner(config)


def default_pruning(sparsity: float | None, importance: str = "l1", *, round_to: int = 1) -> Pruner:
    """Default pruning (the paper's baseline): keep the most important channels, drop the
    rest. Same keep set as :func:`intra_fusion` (``round_to``: see there)."""
    sparsity = _optional_sparsity(sparsity)
    _check_choice("importance", importance, IMPORTANCES)
    _check_round_to(round_to)
    return _pruner(
        _Config(
            "default",
            sparsity,
            importance,
            "uniform",
            "most_important",
            None,
            "reference",
            round_to=round_to,
        )
    )


def _check_round_to(round_to: Any) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")


def _optional_sparsity(sparsity: Any) -> float | None:
    if sparsity is None:
        return None
    check_sparsity(sparsity)
    return float(sparsity)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def _resolve_groups(view: ModelView, groups: Any, example_input: Any):
    """(groups to prune, all groups of the model, or those given when not discovered)."""
    if isinstance(groups, Group):
        groups = (groups,)
    if isinstance(groups, Sequence) and groups and all(isinstance(g, Group) for g in groups):
        found = None if example_input is None else view_groups(view, example_input)
        return tuple(groups), found or tuple(groups)
    if example_input is None:
        raise ValueError("pass Group objects, or example_input so the groups can be discovered")
    found = view_groups(view, example_input)
    if isinstance(groups, str):
        if groups == "all":  # the residual stream only when asked for
            return tuple(g for g in found if g.kind != "residual"), found
        if groups not in GROUP_KINDS:
            raise ValueError(
                f"unknown groups {groups!r}: 'all', a kind {GROUP_KINDS}, indices or Groups"
            )
        return tuple(g for g in found if g.kind == groups), found
    indices = [groups] if isinstance(groups, int) else list(groups)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(found):
            raise ValueError(f"unknown group {i!r}: the model has groups 0..{len(found) - 1}")
    return tuple(found[i] for i in indices), found


def _group_widths(groups: Sequence[Group], sparsity: Any, widths: Any) -> list[int | None]:
    """Per group to prune: its kept channels (``widths``), or None (from the sparsity)."""
    if (sparsity is None) == (widths is None):
        raise ValueError("give either sparsity or widths (kept channels per group)")
    if widths is None:
        check_sparsity(sparsity)
        return [None] * len(groups)
    if not isinstance(widths, Mapping):
        raise ValueError("widths must map group indices to kept channel counts")
    unknown = sorted(set(widths) - {g.index for g in groups})
    if unknown:
        raise ValueError(f"widths names groups {unknown} that are not pruned here")
    missing = [g.index for g in groups if g.index not in widths]
    if missing:
        raise ValueError(f"widths gives no width for groups {missing}")
    return [widths[g.index] for g in groups]


def prune(
    model: Any,
    *args: Any,
    sparsity: float | None = None,
    widths: Mapping[int, int] | None = None,
    method: str = "intra_fusion",
    importance: str = "l1",
    example_input: Any = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    fold: bool = True,
    masked: bool = False,
    gradients: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
    **options: Any,
) -> tuple[Any, ...]:
    """Prunes one group, several groups or all groups of any Linen or NNX model.

    Linen: ``prune(model, variables, groups, ...) -> (pruned_model, variables, plans)``.
    NNX: ``prune(module, groups, ...) -> (pruned_module, plans)``.

    BatchNorm is folded first (``fold=True``, as the reference: every BatchNorm of the
    model when the groups are discovered here or ``example_input`` is given, else those
    of the given groups), then the groups are pruned one after another, each on the
    result of the previous ones.

    The pruned model is called exactly as the original: a Linen model through
    ``pruned_model.apply(variables, *args, **kwargs)`` (``train=True`` with
    ``mutable=["batch_stats"]``, dropout ``rngs``, inside ``jit``/``grad``/``vmap``); the
    models of ``models/`` come back as plain instances through ``for_variables``, any
    other module as an instance of a subclass of its class that runs with the pruned
    widths (see ``ifjax._widths``). An NNX model comes back as a new module (the input
    is untouched) with its width attributes updated, in evaluation mode like the input.

    Args:
      model: a Flax Linen module or an NNX module (in evaluation mode, ``module.eval()``).
      *args: Linen: ``variables, groups``; NNX: ``groups``. ``groups`` is a
        :class:`Group`, a sequence of them, a group index or indices (needs
        ``example_input``), "all" (every group but the residual stream: transformers'
        LayerNorm-normalized channels are pruned only when asked for), or a kind
        ("channels", "neurons", "heads", "residual"). Variables are never modified.
      sparsity: fraction of channels removed from each group, in [0, 1).
      widths: instead of ``sparsity``, ``{group index: channels kept}``.
      method: "intra_fusion" or "default".
      importance: importance metric (see :func:`group_importance`).
      example_input: an input batch, to discover groups (needed for indices and "all").
      apply_kwargs: Linen: extra arguments of every trace, e.g. ``{"train": False}``.
      call_kwargs: NNX: extra call arguments, e.g. ``{"rngs": nnx.Rngs(0)}``.
      fold: fold BatchNorm before pruning.
      masked: keep shapes (pruned channels zeroed, merged weights in place); a Linen
        model is then returned as is.
      gradients: accumulated gradients for ``importance="taylor"`` (of the folded dense
        model; when several groups are pruned physically, each later group scores its
        kept slices with their dense gradients).
      key: PRNG key for ``importance="random"`` (split per group).
      **options: passed to :func:`intra_fusion` (marginals, target, solver, ...);
        ``round_to=k`` (kept counts multiples of k) for either method.

    Example:
      >>> model, variables, plans = prune(model, variables, "all", sparsity=0.5,
      ...                                 example_input=x, apply_kwargs={"train": False})
      >>> small_module, plans = prune(nnx_module, "all", sparsity=0.5, example_input=x)
    """
    nnx_model = is_nnx(model)
    expected = 1 if nnx_model else 2
    if len(args) != expected:
        form = "(module, groups)" if nnx_model else "(model, variables, groups)"
        raise ValueError(f"prune takes {form} positionally, got {len(args) + 1} arguments")
    view, _ = view_and_input(model, (*args[:-1], None), apply_kwargs, call_kwargs)
    variables, groups = view.variables, args[-1]
    _check_choice("method", method, METHODS)
    check_variables_finite(variables)
    groups, every_group = _resolve_groups(view, groups, example_input)
    for group in groups:
        check_group(variables, group)
    group_widths = _group_widths(groups, sparsity, widths)
    if method == "default":
        round_to = options.pop("round_to", 1)
        if options:
            raise ValueError(f"options {sorted(options)} apply to intra_fusion only")
        pruner = default_pruning(sparsity, importance, round_to=round_to)
    else:
        pruner = intra_fusion(sparsity, importance, **options)
    if fold:
        variables = fold_batchnorm(variables, every_group)
    plans = []
    for i, (group, width) in enumerate(zip(groups, group_widths, strict=True)):
        group_key = None if key is None else jax.random.fold_in(key, i)
        plan = pruner.plan(variables, group, width=width, gradients=gradients, key=group_key)
        variables = pruner.apply(variables, group, plan, masked=masked)
        if gradients is not None and not masked:
            # Taylor scores of later groups: each kept channel keeps its slice's gradient
            gradients = select_kernel_channels(gradients, group, plan.keep)
        plans.append(plan)
    if nnx_model:
        return view.rebuild(variables), plans
    if not masked:
        model = view.rebuild(variables)
        if not hasattr(view.model, "for_variables") and example_input is not None:
            _check_pruned_model(model, variables, example_input, view)
    return model, variables, plans


def _check_pruned_model(model: Any, variables: Any, example_input: Any, view: ModelView) -> None:
    """``model.init`` gives the shapes of the pruned variables, else names the layers."""
    rng = jax.random.key(0)
    kwargs = dict(view.kwargs)
    init = lambda x: model.init({"params": rng, "dropout": rng}, x, **kwargs)
    hint = "teach it with ifjax.register_width_rule(layer_type, rule)"
    try:
        expected = shapes_of(jax.eval_shape(init, example_input))
    except Exception as error:  # a layer computes with a width attribute ifjax left alone
        first = str(error).splitlines()[0] if str(error) else ""
        raise GraphError(
            f"the pruned {type(model).__name__} cannot run with the pruned widths "
            f"({type(error).__name__}: {first}): a layer uses a width attribute that ifjax "
            f"does not know (e.g. a head count it reshapes into); {hint}"
        ) from error
    got = shapes_of(variables)
    wrong = [
        "/".join(p) for p in got if p[0] == "params" and p in expected and expected[p] != got[p]
    ]
    if wrong:
        raise GraphError(
            f"the pruned {type(model).__name__} cannot run with the pruned widths: layers "
            f"{wrong[:3]} declare other widths and ifjax knows no width attribute of theirs; "
            "teach it with ifjax.register_width_rule(layer_type, rule)"
        )
