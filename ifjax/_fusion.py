"""Model fusion by optimal transport (OTFusion, Singh & Jaggi 2020), as used by PaF and FaP.

Two or more models of the same architecture (same dependency groups and widths, dense or
pruned alike) are fused by aligning every model to the first one, the *anchor*, and
averaging the aligned weights. Aligning a model means finding, for every group, an
(n, n) transport map ``T`` from its channels to the anchor's and applying it to the
group's writers (output rows, biases, BatchNorm) and readers (input columns). Every
kernel axis belongs to exactly one group, so applying each group's map to its own axes
composes into ``K' = T_out K T_in^T`` for every kernel, in any order.

Channel features (what the cost compares), per group:

* ``"activation"`` (the paper's choice): the output of each writer's BatchNorm (before
  the ReLU; the layer's own output when it has no BatchNorm) on the same input samples,
  one vector per channel over samples and positions, normalized to unit length. A
  residual stream is one group: its features concatenate the BatchNorm outputs of all
  layers writing the stream (each normalized), so the stream gets one map, shared by all
  its writers and readers. The activations of every model are recorded in its original
  channel basis: a permutation of other groups does not change a model's function, so
  the map found for a group does not depend on the maps of the others. Only sufficient
  statistics are kept (channel norms and anchor-model cross products), accumulated over
  chunks of samples, so memory does not grow with the number of samples.
* ``"weight"``: the group's weights, as :func:`ifjax.channel_features`, normalized to
  unit length. Weight vectors mix axes of several groups, so groups are aligned one
  after another, each on the model with the maps found so far applied, and a layer's
  slice is compared only once its other axis is aligned (or is the model's input or
  output): a writer's output rows once the group it reads is aligned, a reader's input
  columns once the group it writes is aligned. Groups are visited so that every group
  has at least one such writer (the first layer writing it reads an earlier group).

Transport, with the pieces pruning uses (``ifjax._transport``, ``ifjax._merge``): the
cost is the squared Euclidean distance between normalized features (computed from the
statistics for ``"activation"``, by ``squared_euclidean_cost`` for ``"weight"``); the
problem has uniform marginals; the solver is exact (POT's network simplex) or entropic
(ott-jax Sinkhorn), from :func:`ifjax.make_solver`. The map is ``barycentric_map``: the
plan scaled so that each anchor channel receives a convex combination of the other
model's channels (a permutation matrix for an exact plan between equal uniform
marginals). ``transport_group`` applies it: kernels, biases and BatchNorm
scale/bias/mean mix linearly, a BatchNorm variance becomes the variance of the mixture,
``T var + max(T mean^2 - (T mean)^2, 0)``.

Averaging: every parameter is the mean of the aligned models; BatchNorm running
statistics are combined as the statistics of the mixture: ``mean = mean_i(mean_i)`` and
``var = mean_i(var_i + mean_i^2) - mean^2``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifjax._channels import channel_features
from ifjax._graph import Group, resolve_segments, view_groups
from ifjax._local import localize
from ifjax._merge import transport_group
from ifjax._model import ModelView, is_nnx, model_view
from ifjax._transport import (
    Solver,
    barycentric_map,
    make_solver,
    normalize_rows,
    squared_euclidean_cost,
    transport_problem,
)
from ifjax._tree import Path, tree_get, tree_paths, tree_replace
from ifjax._validate import check_group, check_variables_finite

__all__ = ["FUSION_METHODS", "align", "average_variables", "fuse"]

FUSION_METHODS = ("activation", "weight")


@dataclasses.dataclass(frozen=True)
class _Config:
    method: str
    solver: Solver
    num_samples: int
    batch_size: int


# ----------------------------------------------------------------------------- maps
# The cost, problem, solver and map come from ifjax._transport, the merge from
# ifjax._merge, as for pruning. Every compiled function takes a group's own arrays under
# canonical names (ifjax._local), so groups of equal structure and shapes share one
# compilation: a fusion compiles a few small functions, not one per operation.


@functools.partial(jax.jit, static_argnames=("solver",))
def _solve_map(cost: jnp.ndarray, solver: Solver) -> jnp.ndarray:
    return barycentric_map(transport_problem(cost).solve(solver).plan)


def _alignment_map(cost: Any, solver: Solver) -> np.ndarray:
    """Map (n_anchor, n_other) from a cost (n_other, n_anchor), uniform marginals.

    Row k of the map holds the weights of the other model's channels that become its
    channel k: the plan's column k divided by its mass, a convex combination.
    """
    return np.asarray(_solve_map(jnp.asarray(cost, jnp.float32), solver))


@functools.partial(jax.jit, static_argnames=("group",))
def _transport_local(variables, group: Group, transport):
    # full float32 products: a permutation must move weights exactly (no TF32 on GPUs)
    with jax.default_matmul_precision("float32"):
        return transport_group(variables, group, transport)


def _transport_group(variables: Any, group: Group, transport: Any) -> dict[str, Any]:
    """Applies an (n, n) map to every slice of a group (see ``ifjax._merge``)."""
    local = localize(resolve_segments(variables, group))
    merged = _transport_local(local.gather(variables), local.group, jnp.asarray(transport))
    return local.scatter(variables, merged)


def _transport_all(variables: Any, groups: Sequence[Group], maps: Mapping[int, Any]) -> Any:
    for group in groups:
        variables = _transport_group(variables, group, maps[group.index])
    return variables


def _to_host(variables: Mapping[str, Any]) -> dict[str, Any]:
    return jax.tree.map(np.asarray, jax.device_get(dict(variables)))


def _to_device(variables: Mapping[str, Any]) -> dict[str, Any]:
    return jax.tree.map(jnp.asarray, dict(variables))


# ----------------------------------------------------------------------------- activations


def _captured_module(writer) -> Path:
    return writer.batchnorm.module if writer.batchnorm is not None else writer.module


def _group_modules(group: Group) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(_captured_module(w) for w in group.writers))


def _activation_function(view: ModelView, modules: tuple[Path, ...]):
    """A compiled ``(variables, x) -> {module: (channels, samples * positions)}`` of the
    outputs of the given modules."""

    @jax.jit
    def activations(variables, x):
        outputs = view.capture(variables, x, modules)
        return {m: jnp.moveaxis(v, -1, 0).reshape(v.shape[-1], -1) for m, v in outputs.items()}

    return activations


@jax.jit
def _accumulate(stats, anchor, other):
    """Adds a chunk's squared channel norms and anchor-other cross products."""
    norms_a, norms_b, cross = stats
    return (
        {m: norms_a[m] + jnp.sum(anchor[m] ** 2, 1) for m in anchor},
        {m: norms_b[m] + jnp.sum(other[m] ** 2, 1) for m in other},
        {m: cross[m] + jnp.matmul(anchor[m], other[m].T, precision="highest") for m in anchor},
    )


def _zero_statistics(anchor, other):
    norms = lambda acts: {m: jnp.zeros(a.shape[0]) for m, a in acts.items()}
    cross = {m: jnp.zeros((anchor[m].shape[0], other[m].shape[0])) for m in anchor}
    return norms(anchor), norms(other), cross


def _statistics(view: ModelView, variables_list, modules, inputs, config: _Config):
    """Per other model: (anchor norms^2, its norms^2, cross products) per module."""
    activations = _activation_function(view, modules)
    stats = [None] * (len(variables_list) - 1)
    for start in range(0, config.num_samples, config.batch_size):
        x = jnp.asarray(inputs[start : min(start + config.batch_size, config.num_samples)])
        anchor = activations(variables_list[0], x)
        for i, variables in enumerate(variables_list[1:]):
            other = activations(variables, x)
            stats[i] = _accumulate(stats[i] or _zero_statistics(anchor, other), anchor, other)
    return stats


def _activation_cost(stats, modules: Sequence[Path]) -> np.ndarray:
    """Mean over modules of squared distances of normalized activations, (n_other, n_anchor)."""
    norms_a, norms_b, cross = stats
    total = 0.0
    for m in modules:
        na, nb = np.sqrt(norms_a[m]), np.sqrt(norms_b[m])
        cosine = cross[m] / np.where(na > 0, na, 1.0)[:, None] / np.where(nb > 0, nb, 1.0)
        unit_a, unit_b = (na > 0).astype(np.float64), (nb > 0).astype(np.float64)
        total = total + unit_a[:, None] + unit_b[None, :] - 2 * cosine
    return np.maximum(total / len(modules), 0.0).T


def _activation_alignment(view: ModelView, variables_list, groups, inputs, config: _Config):
    """Aligned variables and maps of every non-anchor model, from activations."""
    modules = tuple(dict.fromkeys(m for g in groups for m in _group_modules(g)))
    all_stats = _statistics(view, variables_list, modules, inputs, config)
    results = []
    for variables, stats in zip(variables_list[1:], all_stats, strict=True):
        stats = jax.tree.map(lambda x: np.asarray(x, np.float64), stats)
        maps = {
            g.index: _alignment_map(_activation_cost(stats, _group_modules(g)), config.solver)
            for g in groups
        }
        results.append((_transport_all(_to_device(variables), groups, maps), maps))
    return results


# ----------------------------------------------------------------------------- weights


def _neighbour_groups(groups: Sequence[Group]) -> tuple[dict[Path, int], dict[Path, int]]:
    """{kernel: group it reads} and {kernel: group it writes}."""
    reads = {r.kernel: g.index for g in groups for r in g.readers}
    writes = {w.kernel: g.index for g in groups for w in g.writers}
    return reads, writes


def _forward_order(groups: Sequence[Group]) -> list[Group]:
    """Groups so that each has a writer reading the input or an earlier group."""
    reads, _ = _neighbour_groups(groups)
    order, done, left = [], {-1}, sorted(groups, key=lambda g: -g.index)
    while left:
        ready = [g for g in left if any(reads.get(w.kernel, -1) in done for w in g.writers)]
        group = ready[0] if ready else left[0]
        order.append(group)
        done.add(group.index)
        left.remove(group)
    return order


def _compared_slices(group: Group, done: set[int], neighbours) -> Group:
    """The part of a group whose weight slices are compared: the writers whose input is
    aligned (all writers if none is), the readers whose output is aligned."""
    reads, writes = neighbours
    writers = tuple(w for w in group.writers if reads.get(w.kernel, -1) in done)
    readers = tuple(r for r in group.readers if writes.get(r.kernel, -1) in done)
    return dataclasses.replace(
        group, writers=writers or group.writers, readers=readers, channel_params=()
    )


@functools.partial(jax.jit, static_argnames=("group",))
def _weight_cost(anchor, other, group: Group) -> jnp.ndarray:
    """Cost (n_other, n_anchor) between the unit-norm weight features of ``group`` (see
    :func:`_compared_slices`) of the two models."""
    features_a = normalize_rows(channel_features(anchor, group))
    features_b = normalize_rows(channel_features(other, group))
    return squared_euclidean_cost(features_b, features_a)


def _weight_alignment(anchor, other, groups: Sequence[Group], config: _Config):
    """Aligns one model to the anchor group by group (see the module docstring)."""
    anchor, other = _to_device(anchor), _to_device(other)
    neighbours = _neighbour_groups(groups)
    done, maps = {-1}, {}
    for group in _forward_order(groups):
        local = localize(_compared_slices(group, done, neighbours))
        cost = _weight_cost(local.gather(anchor), local.gather(other), local.group)
        maps[group.index] = _alignment_map(cost, config.solver)
        other = _transport_group(other, group, maps[group.index])
        done.add(group.index)
    return other, maps


# ----------------------------------------------------------------------------- public


def average_variables(variables_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Averages models of equal shapes; BatchNorm statistics as those of the mixture.

    Every leaf becomes the mean over the models, except a ``batch_stats`` ``var`` next to
    a ``mean``: ``var = mean_i(var_i + mean_i^2) - mean^2`` with ``mean = mean_i(mean_i)``.

    Args:
      variables_list: variables of one architecture (already aligned for fusion).

    Returns:
      The averaged variables (plain nested dicts of jax arrays).

    Example:
      >>> fused = average_variables([variables_a, aligned_b])
    """
    if not variables_list:
        raise ValueError("average_variables needs at least one model")
    host = [_to_host(v) for v in variables_list]
    mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *host)
    paths = tree_paths(mean)
    updates = {}
    for path in paths:
        mean_path = path[:-1] + ("mean",)
        if path[0] != "batch_stats" or path[-1] != "var" or mean_path not in paths:
            continue
        second = [tree_get(v, path) + tree_get(v, mean_path) ** 2 for v in host]
        updates[path] = np.maximum(sum(second) / len(second) - paths[mean_path] ** 2, 0.0)
    return jax.tree.map(jnp.asarray, tree_replace(mean, updates))


def _config(method, solver, num_samples, batch_size, options) -> _Config:
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {FUSION_METHODS}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}"
        )
    solver = make_solver(
        solver,
        epsilon=options.pop("epsilon", 1e-3),
        max_iterations=options.pop("max_iterations", 5000),
        threshold=options.pop("threshold", 1e-4),
    )
    if options:
        raise ValueError(f"unknown options {sorted(options)}")
    return _Config(method, solver, int(num_samples), int(batch_size))


def _prepare(view: ModelView, variables_list, example_input, groups, inputs, config: _Config):
    """Checks the models and inputs; discovers the groups if needed."""
    if len(variables_list) < 2:
        raise ValueError(f"fusion needs at least two models, got {len(variables_list)}")
    shapes = [jax.tree.map(np.shape, v) for v in variables_list]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("models to fuse must have the same variables and shapes (equal widths)")
    for variables in variables_list:
        check_variables_finite(variables)
    if config.method == "activation":
        if inputs is None:
            raise ValueError("method='activation' needs inputs: samples to record activations on")
        if len(inputs) < config.num_samples:
            raise ValueError(f"need {config.num_samples} input samples, got {len(inputs)}")
    if groups is None:
        if example_input is None:
            example_input = None if inputs is None else np.asarray(inputs[:1])
        if example_input is None:
            raise ValueError("pass groups, example_input or inputs to discover the groups")
        groups = view_groups(view, example_input)
    groups = tuple(groups)
    for group in groups:
        check_group(variables_list[0], group)
        if group.partitions:
            raise ValueError(
                f"group {group.index} of {group.layer or 'the model'} is split into equal "
                f"blocks ({group.partitions[0].describe()}): fusion aligns channels by "
                "permutations across the whole group, which would mix the blocks; not supported"
            )
    return groups


def _models(
    model: Any, args: tuple, apply_kwargs: Any, call_kwargs: Any, count: int | None
) -> tuple[ModelView, list[dict[str, Any]]]:
    """The view of the first model and every model's variables, from Linen
    ``(model, variables...)`` or NNX ``(module...)`` arguments."""
    if is_nnx(model) or (isinstance(model, Sequence) and model and is_nnx(model[0])):
        modules = list(model) if isinstance(model, Sequence) else [model, *args]
        if count is not None and len(modules) != count:
            raise ValueError(f"expected {count} NNX modules, got {len(modules)}")
        if apply_kwargs is not None:
            raise ValueError("apply_kwargs is for Linen modules; NNX modules take call_kwargs")
        views = [model_view(m, None, call_kwargs) for m in modules]
        return views[0], [v.variables for v in views]
    variables_list = list(args[0]) if count is None else list(args)
    if count is not None and len(variables_list) != count:
        raise ValueError(f"expected a Linen model and {count} variable trees")
    if call_kwargs is not None:
        raise ValueError("call_kwargs is for NNX modules; Linen modules take apply_kwargs")
    return model_view(model, variables_list[0], apply_kwargs), variables_list


def align(
    model: Any,
    *args: Any,
    example_input: Any = None,
    groups: Sequence[Group] | None = None,
    method: str = "activation",
    inputs: Any = None,
    num_samples: int = 200,
    solver: str | Any = "exact",
    batch_size: int = 50,
    apply_kwargs: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[Any, dict[int, np.ndarray]]:
    """Aligns the channels of one model to those of an anchor (the OTFusion step).

    Linen: ``align(model, anchor_variables, other_variables, ...)``; NNX:
    ``align(anchor_module, other_module, ...)``. Other arguments as :func:`fuse`.

    Returns:
      ``(aligned, maps)``: the other model (variables, or a new NNX module) with every
      group's map applied (for exact plans a permutation of its channels, so it computes
      the same function), and ``{group index: (n, n) map}``, row k being the weights of
      the other model's channels that become channel k.

    Example:
      >>> aligned, maps = align(model, variables_a, variables_b, inputs=images[:200])
    """
    config = _config(method, solver, num_samples, batch_size, options)
    view, variables_list = _models(model, args, apply_kwargs, call_kwargs, 2)
    groups = _prepare(view, variables_list, example_input, groups, inputs, config)
    if config.method == "activation":
        aligned, maps = _activation_alignment(view, variables_list, groups, inputs, config)[0]
    else:
        aligned, maps = _weight_alignment(*variables_list, groups, config)
    aligned = jax.tree.map(jnp.asarray, aligned)
    return (view.rebuild(aligned) if view.kind == "nnx" else aligned), maps


def fuse(
    model: Any,
    *args: Any,
    example_input: Any = None,
    groups: Sequence[Group] | None = None,
    method: str = "activation",
    inputs: Any = None,
    num_samples: int = 200,
    solver: str | Any = "exact",
    batch_size: int = 50,
    apply_kwargs: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> Any:
    """Fuses models of one architecture by OTFusion: align to the first, then average.

    Linen: ``fuse(model, variables_list, ...) -> variables``; NNX:
    ``fuse(modules, ...) -> module`` (a new module; the inputs are untouched and must be
    in evaluation mode).

    Args:
      model: the Flax Linen module of all the variables (dense or pruned, equal widths),
        or a sequence of NNX modules of one architecture.
      *args: Linen: ``variables_list``, two or more ``{"params": ..., "batch_stats":
        ...}``; the first is the anchor the others are aligned to. Never modified.
      example_input: an input batch to discover the groups (default: ``inputs[:1]``).
      groups: the model's groups from :func:`discover_groups` (all of them), instead.
      method: ``"activation"`` (the paper's choice) or ``"weight"`` (see the module
        docstring).
      inputs: (N, H, W, C) samples for ``"activation"``; the first ``num_samples`` are
        used, the same for every model.
      num_samples: samples to record activations on (the paper: 200).
      solver: ``"exact"`` (POT network simplex), ``"sinkhorn"`` (ott-jax; options
        ``epsilon``, ``max_iterations``, ``threshold``) or a solver object
        ``solver(cost, a, b) -> TransportResult``.
      batch_size: samples per forward pass while recording activations.
      apply_kwargs: Linen: passed to ``model.apply`` (e.g. ``{"train": False}``).
      call_kwargs: NNX: passed to every call of the modules.
      **options: Sinkhorn settings.

    Returns:
      The fused variables, with the anchor's structure and shapes (NNX: a new module).

    Example:
      >>> fused = fuse(model, [variables_a, variables_b], inputs=train_images[:200])
      >>> logits = model.apply(fused, x)
      >>> fused_module = fuse([module_a, module_b], inputs=train_images[:200])
    """
    config = _config(method, solver, num_samples, batch_size, options)
    view, variables_list = _models(model, args, apply_kwargs, call_kwargs, None)
    groups = _prepare(view, variables_list, example_input, groups, inputs, config)
    if config.method == "activation":
        aligned = _activation_alignment(view, variables_list, groups, inputs, config)
    else:
        aligned = [
            _weight_alignment(variables_list[0], v, groups, config) for v in variables_list[1:]
        ]
    fused = average_variables([variables_list[0]] + [a for a, _ in aligned])
    return view.rebuild(fused) if view.kind == "nnx" else fused
