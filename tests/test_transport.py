"""The transport core (problem, solvers, maps, merge) and pure, trace-clean plan/apply."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax._merge import transport_group
from ifjax._transport import barycentric_map, squared_euclidean_cost
from ifjax._tree import tree_get
from tests.conftest import random_variables
from tests.tree_asserts import assert_trees_equal

# ----------------------------------------------------------------------------- problem


def _masses(rng, size):
    weights = rng.uniform(0.5, 2.0, size)
    return jnp.asarray(weights / weights.sum(), jnp.float32)


def test_transport_problem_is_a_pytree_with_uniform_default_marginals():
    cost = jnp.arange(12.0).reshape(3, 4)
    problem = ifjax.transport_problem(cost)
    np.testing.assert_array_equal(problem.a, np.full(3, 1 / 3, np.float32))
    np.testing.assert_array_equal(problem.b, np.full(4, 1 / 4, np.float32))
    leaves, treedef = jax.tree.flatten(problem)
    assert len(leaves) == 3
    assert jax.tree.unflatten(treedef, leaves) == problem
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), problem, problem)
    assert isinstance(stacked, ifjax.TransportProblem) and stacked.cost.shape == (2, 3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.a = problem.b
    with pytest.raises(ValueError, match="do not fit"):
        ifjax.transport_problem(cost, a=jnp.ones(4) / 4)
    with pytest.raises(ValueError, match="matrix"):
        ifjax.transport_problem(jnp.ones(3))


def test_exact_plan_has_the_problem_marginals():
    rng = np.random.default_rng(0)
    a, b = _masses(rng, 7), _masses(rng, 4)
    cost = jnp.asarray(rng.uniform(size=(7, 4)), jnp.float32)
    problem = ifjax.transport_problem(cost, a, b)
    result = problem.solve(ifjax.make_solver("exact"))
    assert result.plan.shape == (7, 4) and bool(result.converged)
    np.testing.assert_allclose(result.plan.sum(1), a, atol=1e-6)
    np.testing.assert_allclose(result.plan.sum(0), b, atol=1e-6)
    assert np.all(np.asarray(result.plan) >= 0)
    # an exact plan is a vertex: at most n + m - 1 non-zero entries
    assert np.count_nonzero(np.asarray(result.plan) > 1e-9) <= 7 + 4 - 1
    # the same under jit, and vmapped over stacked problems (the callback runs in turn)
    jitted = jax.jit(lambda p: p.solve(ifjax.ExactSolver()).plan)(problem)
    np.testing.assert_array_equal(jitted, result.plan)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), problem, problem)
    batched = jax.vmap(lambda p: p.solve(ifjax.ExactSolver()).plan)(stacked)
    np.testing.assert_array_equal(batched[1], result.plan)


def test_sinkhorn_plan_approaches_the_marginals():
    rng = np.random.default_rng(1)
    a, b = _masses(rng, 6), _masses(rng, 6)
    cost = jnp.asarray(rng.uniform(size=(6, 6)), jnp.float32)
    solver = ifjax.make_solver("sinkhorn", epsilon=1e-2, threshold=1e-5, max_iterations=5000)
    result = jax.jit(lambda p: p.solve(solver))(ifjax.transport_problem(cost, a, b))
    assert bool(result.converged) and float(result.marginal_error) < 1e-5
    np.testing.assert_allclose(result.plan.sum(1), a, atol=1e-4)
    np.testing.assert_allclose(result.plan.sum(0), b, atol=1e-4)


def test_make_solver():
    assert ifjax.make_solver("exact") == ifjax.ExactSolver()
    sinkhorn = ifjax.make_solver("sinkhorn", epsilon=0.1, max_iterations=7, threshold=1e-3)
    assert sinkhorn == ifjax.SinkhornSolver(epsilon=0.1, threshold=1e-3, max_iterations=7)
    custom = ifjax.ExactSolver()
    assert ifjax.make_solver(custom) is custom
    for bad in ("network_simplex", 3, None):
        with pytest.raises(ValueError, match="unknown solver"):
            ifjax.make_solver(bad)


@dataclasses.dataclass(frozen=True)
class _IndependentCoupling:
    """A user solver (the Solver protocol): the plan ``a b^T``, whatever the cost."""

    def __call__(self, cost, a, b) -> ifjax.TransportResult:
        plan = a[:, None] * b[None, :]
        return ifjax.TransportResult(plan, jnp.array(True), jnp.array(0), jnp.array(0.0))


def test_a_user_solver_follows_the_protocol(tiny_vgg):
    _, _, _, groups, folded = _setup(tiny_vgg)
    solver = _IndependentCoupling()
    assert isinstance(solver, ifjax.Solver)
    assert ifjax.make_solver(solver) is solver
    plan = ifjax.intra_fusion(0.5, solver=solver).plan(folded, groups[1])
    # every source channel is split evenly among the 8 kept ones (uniform marginals)
    np.testing.assert_allclose(plan.reader_map, np.full((8, 16), 1 / 8), rtol=1e-6)
    exact = ifjax.intra_fusion(0.5).plan(folded, groups[1])
    np.testing.assert_array_equal(plan.keep, exact.keep)


# ----------------------------------------------------------------------------- cost and maps


def test_costs_equal_the_direct_distances():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(3, 5))
    differences = x[:, None, :] - y[None, :, :]
    as32 = lambda v: jnp.asarray(v, jnp.float32)
    np.testing.assert_allclose(
        squared_euclidean_cost(as32(x), as32(y)), (differences**2).sum(-1), rtol=1e-5
    )
    np.testing.assert_allclose(
        ifjax.l1_cost(as32(x), as32(y)), np.abs(differences).sum(-1), rtol=1e-5
    )
    same = squared_euclidean_cost(as32(x), as32(x))
    np.testing.assert_array_equal(np.diag(same), 0.0)  # exactly, never negative


def test_maps_from_a_plan():
    rng = np.random.default_rng(3)
    a, b = _masses(rng, 6), _masses(rng, 4)
    cost = jnp.asarray(rng.uniform(size=(6, 4)), jnp.float32)
    plan = ifjax.transport_problem(cost, a, b).solve(ifjax.ExactSolver()).plan
    # pruning: every source channel's mass is split among the targets
    np.testing.assert_allclose(ifjax.transport_map(plan, a).sum(0), 1.0, rtol=1e-5)
    # fusion: every target is a convex combination of the sources
    fusion_map = barycentric_map(plan)
    assert fusion_map.shape == (4, 6) and np.all(np.asarray(fusion_map) >= 0)
    np.testing.assert_allclose(fusion_map.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(fusion_map, np.asarray(plan).T / np.asarray(b)[:, None], rtol=1e-5)


def test_barycentric_map_of_equal_uniform_marginals_is_a_permutation():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(5, 3)).astype(np.float32)
    perm = rng.permutation(5)
    cost = squared_euclidean_cost(jnp.asarray(features[perm]), jnp.asarray(features))
    plan = ifjax.transport_problem(cost).solve(ifjax.ExactSolver()).plan
    # target k (features[k]) receives source perm^-1[k], which holds features[k]
    np.testing.assert_array_equal(barycentric_map(plan), np.eye(5)[np.argsort(perm)])


# ----------------------------------------------------------------------------- merge


def _setup(fixture):
    model, variables, x = fixture
    groups = ifjax.discover_groups(model, variables, x)
    return model, variables, x, groups, ifjax.fold_batchnorm(variables, groups)


def test_fusion_merge_mixes_batchnorm_statistics(tiny_vgg):
    """One (n, n) map applied to every slice of a group, BatchNorm var as a mixture."""
    model, variables, x = tiny_vgg
    groups = ifjax.discover_groups(model, variables, x)
    group = groups[2]  # conv0 -> bn0, read by conv1
    rng = np.random.default_rng(5)
    transport = rng.uniform(size=(8, 8)).astype(np.float32)
    transport /= transport.sum(1, keepdims=True)
    mixed = jax.jit(transport_group, static_argnums=1)(variables, group, transport)
    get = lambda tree, path: np.asarray(tree_get(tree, path), np.float64)
    t = transport.astype(np.float64)
    for path in [
        ("params", "conv0", "bias"),
        ("params", "bn0", "scale"),
        ("params", "bn0", "bias"),
    ]:
        np.testing.assert_allclose(get(mixed, path), t @ get(variables, path), atol=1e-7)
    mean = get(variables, ("batch_stats", "bn0", "mean"))
    var = get(variables, ("batch_stats", "bn0", "var"))
    np.testing.assert_allclose(get(mixed, ("batch_stats", "bn0", "mean")), t @ mean, atol=1e-7)
    mixture = t @ var + t @ mean**2 - (t @ mean) ** 2
    np.testing.assert_allclose(get(mixed, ("batch_stats", "bn0", "var")), mixture, rtol=1e-5)
    kernel = get(variables, ("params", "conv0", "kernel"))
    np.testing.assert_allclose(
        get(mixed, ("params", "conv0", "kernel")), kernel @ t.T, rtol=1e-5, atol=1e-7
    )
    reader = get(variables, ("params", "conv1", "kernel"))
    expected = np.einsum("kj,hwjo->hwko", t, reader)
    np.testing.assert_allclose(
        get(mixed, ("params", "conv1", "kernel")), expected, rtol=1e-5, atol=1e-7
    )


# ----------------------------------------------------------------------------- jit and vmap

PRUNERS = {
    "intra_fusion": lambda: ifjax.intra_fusion(0.5),
    "centroids_importance": lambda: ifjax.intra_fusion(
        0.5, "lamp", target="centroids", marginals="importance"
    ),
    "default": lambda: ifjax.default_pruning(0.5),
}


def _stack(*trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


# every pruner on a VGG group, the plain ones on a residual stream of the ResNet
CASES = [("tiny_vgg", 1, name) for name in sorted(PRUNERS)] + [
    ("tiny_resnet", 3, "intra_fusion"),
    ("tiny_resnet", 3, "default"),
]


def _two_models(fixture):
    """The folded variables of the fixture and of a second model of its architecture."""
    model, variables, x, groups, folded = _setup(fixture)
    other = ifjax.fold_batchnorm(random_variables(model, x, seed=7), groups)
    return groups, folded, other


@pytest.mark.parametrize("name,group_index,pruner_name", CASES)
def test_plan_and_apply_under_jit_equal_the_eager_results(name, group_index, pruner_name, request):
    groups, folded, _ = _two_models(request.getfixturevalue(name))
    group, pruner = groups[group_index], PRUNERS[pruner_name]()
    plan = pruner.plan(folded, group)
    jitted_plan = jax.jit(lambda v: pruner.plan(v, group))(folded)
    np.testing.assert_array_equal(jitted_plan.keep, plan.keep)
    assert_trees_equal(jitted_plan, plan, rtol=1e-6, atol=1e-12)
    pruned = pruner.apply(folded, group, plan)
    assert_trees_equal(jax.jit(lambda v, p: pruner.apply(v, group, p))(folded, plan), pruned)
    masked = pruner.apply(folded, group, plan, masked=True)
    jitted = jax.jit(lambda v, p: pruner.apply(v, group, p, masked=True))(folded, plan)
    assert_trees_equal(jitted, masked)


@pytest.mark.parametrize("pruner_name", ["intra_fusion", "default"])
@pytest.mark.parametrize("name,group_index", [("tiny_vgg", 1), ("tiny_resnet", 3)])
def test_apply_vmapped_over_stacked_models_equals_applying_to_each(
    pruner_name, name, group_index, request
):
    groups, folded, other = _two_models(request.getfixturevalue(name))
    group, pruner = groups[group_index], PRUNERS[pruner_name]()
    plan = pruner.plan(folded, group)  # one plan for both models
    stacked = _stack(folded, other)
    batched = jax.vmap(lambda v: pruner.apply(v, group, plan))(stacked)
    for i, variables in enumerate((folded, other)):
        single = pruner.apply(variables, group, plan)
        assert_trees_equal(_index(batched, i), single, rtol=1e-6, atol=1e-7)
    masked = jax.vmap(lambda v: pruner.apply(v, group, plan, masked=True))(stacked)
    single = pruner.apply(other, group, plan, masked=True)
    assert_trees_equal(_index(masked, 1), single, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,group_index,pruner_name", CASES)
def test_plan_vmapped_over_stacked_models_equals_planning_each(
    name, group_index, pruner_name, request
):
    """The exact solver's host callback runs once per model (vmap_method="sequential")."""
    groups, folded, other = _two_models(request.getfixturevalue(name))
    group, pruner = groups[group_index], PRUNERS[pruner_name]()
    batched = jax.vmap(lambda v: pruner.plan(v, group))(_stack(folded, other))
    assert batched.writer_map.shape[0] == 2
    for i, variables in enumerate((folded, other)):
        single = pruner.plan(variables, group)
        np.testing.assert_array_equal(batched.keep[i], single.keep)
        assert_trees_equal(_index(batched, i), single, rtol=1e-6, atol=1e-7)
    # and jitted and vmapped, applied to each model with its own plan
    plan_and_apply = jax.jit(jax.vmap(lambda v: pruner.apply(v, group, pruner.plan(v, group))))
    pruned = plan_and_apply(_stack(folded, other))
    single = pruner.apply(other, group, pruner.plan(other, group))
    assert_trees_equal(_index(pruned, 1), single, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("n,m,seed", [(8, 4, 10), (12, 5, 12), (5, 3, 13)])
def test_sinkhorn_at_small_epsilon_approaches_the_exact_plan(n, m, seed):
    """Against POT's exact plan (ot.emd, float64) of small problems with random costs
    (a unique optimum): at epsilon 1e-3 (of the mean cost) every entry of the Sinkhorn
    plan is within 2e-4 of it (masses are ~1/n) and its cost within 2e-4 relative; at
    epsilon 0.3 the entropic blur is visible."""
    import ot

    rng = np.random.default_rng(seed)
    a, b = _masses(rng, n), _masses(rng, m)
    cost = rng.uniform(size=(n, m))
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    exact = ot.emd(a64 / a64.sum(), b64 / b64.sum(), cost)
    problem = ifjax.transport_problem(jnp.asarray(cost, jnp.float32), a, b)
    small = ifjax.make_solver("sinkhorn", epsilon=1e-3, threshold=1e-4, max_iterations=20000)
    result = problem.solve(small)
    assert bool(result.converged)
    plan = np.asarray(result.plan, np.float64)
    np.testing.assert_allclose(plan, exact, atol=2e-4)
    np.testing.assert_allclose((plan * cost).sum(), (exact * cost).sum(), rtol=2e-4)
    blurred = np.asarray(problem.solve(ifjax.make_solver("sinkhorn", epsilon=0.3)).plan)
    assert np.abs(blurred - exact).max() > 1e-2


def _kmeans_by_hand(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Lloyd's algorithm until the assignment stops changing."""
    assignment = None
    for _ in range(100):
        distances = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
        new = distances.argmin(1)
        if assignment is not None and np.array_equal(new, assignment):
            return centroids
        assignment = new
        centroids = np.stack(
            [points[new == k].mean(0) if np.any(new == k) else c for k, c in enumerate(centroids)]
        )
    raise AssertionError("k-means did not converge")


def test_centroid_targets_against_numpy_kmeans(tiny_vgg):
    """target="centroids": k-means (numpy, from the kept channels) of the normalized
    channel features built by hand, L1 cost to the centroids, exact plan by ot.emd."""
    import ot

    _, _, _, groups, folded = _setup(tiny_vgg)
    group = groups[1]  # conv1 (16 channels) read by conv2
    plan = ifjax.intra_fusion(0.5, target="centroids").plan(folded, group)
    kept_plan = ifjax.intra_fusion(0.5).plan(folded, group)
    keep = np.asarray(plan.keep)
    np.testing.assert_array_equal(keep, kept_plan.keep)
    w = np.asarray(tree_get(folded, ("params", "conv1", "kernel")), np.float64)
    r = np.asarray(tree_get(folded, ("params", "conv2", "kernel")), np.float64)
    features = np.concatenate(
        [np.moveaxis(w, 3, 0).reshape(16, -1), np.moveaxis(r, 2, 0).reshape(16, -1)], axis=1
    )
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    centroids = _kmeans_by_hand(features, features[keep])
    assert np.abs(centroids - features[keep]).max() > 0.05  # the targets moved
    cost = np.abs(features[:, None, :] - centroids[None]).sum(-1)
    exact = ot.emd(np.full(16, 1 / 16), np.full(8, 1 / 8), cost)
    expected = exact.T * 16  # the map P^T diag(1/a)
    np.testing.assert_allclose(plan.reader_map, expected, atol=1e-5)
    assert np.abs(np.asarray(kept_plan.reader_map) - expected).max() > 0.5
