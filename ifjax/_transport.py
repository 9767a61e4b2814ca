"""The optimal-transport core shared by pruning and fusion: cost, problem, solver, map.

Follows ott-jax's split: a cost between channel features (:func:`l1_cost` for
Intra-Fusion, :func:`squared_euclidean_cost` for OTFusion), a problem holding the cost
and its marginals (:class:`TransportProblem`, built by :func:`transport_problem`), a
solver behind one protocol (:class:`Solver`: exact network simplex, or entropic Sinkhorn
from ott-jax; :func:`make_solver` turns the names into solvers), and a map derived from
the plan (:func:`transport_map` for pruning, :func:`barycentric_map` for fusion), which
``ifjax._merge`` applies to a group's weights.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ExactSolver",
    "SinkhornSolver",
    "Solver",
    "TransportProblem",
    "TransportResult",
    "barycentric_map",
    "l1_cost",
    "make_solver",
    "marginals",
    "normalize_rows",
    "source_marginal",
    "squared_euclidean_cost",
    "transport_map",
    "transport_problem",
]

SOLVERS = ("exact", "sinkhorn")


# ----------------------------------------------------------------------------- cost


def normalize_rows(features: jnp.ndarray) -> jnp.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (the reference gives NaN)."""
    norm = jnp.linalg.norm(features, axis=1, keepdims=True)
    return features / jnp.where(norm > 0, norm, 1.0)


def l1_cost(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Pairwise L1 distances (n, m) between rows of x (n, D) and y (m, D).

    Computed row by row so memory stays O(m * D) for wide layers.
    """
    return jax.lax.map(lambda row: jnp.sum(jnp.abs(y - row), axis=1), x, batch_size=16)


def squared_euclidean_cost(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Pairwise squared Euclidean distances (n, m) between rows of x (n, D) and y (m, D).

    Computed row by row, as :func:`l1_cost`, from the differences (never negative, and
    exactly 0 between equal rows).
    """
    return jax.lax.map(lambda row: jnp.sum((y - row) ** 2, axis=1), x, batch_size=16)


# ----------------------------------------------------------------------------- problem


def source_marginal(kind: str, importance: jnp.ndarray) -> jnp.ndarray:
    """Source masses (n,) of :func:`marginals`; they do not depend on the keep set."""
    if kind == "uniform":
        return jnp.full(importance.shape, 1.0 / importance.shape[0])
    if kind == "importance":
        return importance / jnp.sum(importance)
    raise ValueError(f"unknown marginals {kind!r}; choose 'uniform' or 'importance'")


def marginals(
    kind: str, importance: jnp.ndarray, keep: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Source (n,) and target (m,) masses: "uniform" or "importance"."""
    a = source_marginal(kind, importance)
    if kind == "uniform":
        m = keep.shape[0]
        return a, jnp.full((m,), 1.0 / m)
    kept = importance[keep]
    return a, kept / jnp.sum(kept)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransportProblem:
    """A linear transport problem: move the masses ``a`` onto ``b`` at a cost.

    Build it with :func:`transport_problem`. It is a pytree of arrays (stack problems of
    equal shapes to ``jax.vmap`` a solver over them).

    Attributes:
      cost: (n, m) cost of moving a unit of mass from source i to target j.
      a: (n,) source masses.
      b: (m,) target masses.
    """

    cost: jnp.ndarray
    a: jnp.ndarray
    b: jnp.ndarray

    def solve(self, solver: Solver) -> TransportResult:
        """The plan of this problem, found by ``solver``."""
        return solver(self.cost, self.a, self.b)


def transport_problem(
    cost: jnp.ndarray, a: jnp.ndarray | None = None, b: jnp.ndarray | None = None
) -> TransportProblem:
    """The problem of a cost (n, m) and its marginals (uniform when not given).

    Args:
      cost: (n, m) pairwise cost between source and target channels.
      a: (n,) source masses; default ``1 / n`` each.
      b: (m,) target masses; default ``1 / m`` each.

    Example:
      >>> problem = transport_problem(l1_cost(features, features[keep]))
      >>> plan = problem.solve(ExactSolver()).plan
    """
    cost = jnp.asarray(cost)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a matrix (n, m), got shape {cost.shape}")
    n, m = cost.shape
    a = jnp.full((n,), 1.0 / n) if a is None else jnp.asarray(a)
    b = jnp.full((m,), 1.0 / m) if b is None else jnp.asarray(b)
    if a.shape != (n,) or b.shape != (m,):
        raise ValueError(f"marginals of shapes {a.shape}, {b.shape} do not fit a cost {(n, m)}")
    return TransportProblem(cost, a, b)


# ----------------------------------------------------------------------------- solvers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransportResult:
    """A transport plan (n, m) and how the solver got there."""

    plan: jnp.ndarray
    converged: jnp.ndarray
    iterations: jnp.ndarray
    marginal_error: jnp.ndarray


@runtime_checkable
class Solver(Protocol):
    """What a transport solver is: ``solver(cost, a, b) -> TransportResult``.

    ``cost`` is (n, m), ``a`` (n,) and ``b`` (m,) the masses; the result's plan is (n, m).
    A solver must be hashable (it is a static argument of compiled functions) and
    traceable (it runs inside ``jit`` and ``vmap``).
    """

    def __call__(self, cost: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> TransportResult: ...


def _emd_host(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import ot  # POT: the reference's network-simplex solver

    cost = np.asarray(cost, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    plan = ot.emd(a / a.sum(), b / b.sum(), cost, numItermax=1_000_000)
    return plan.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ExactSolver:
    """Exact optimal transport: POT's network simplex in float64, on the host.

    It runs behind :func:`jax.pure_callback`, so it can be called inside ``jit`` (and
    under ``vmap``, one problem at a time).
    """

    def __call__(self, cost: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> TransportResult:
        shape = jax.ShapeDtypeStruct(cost.shape, jnp.float32)
        plan = jax.pure_callback(_emd_host, shape, cost, a, b, vmap_method="sequential")
        error = jnp.abs(plan.sum(1) - a / a.sum()).sum()
        return TransportResult(plan, jnp.array(True), jnp.array(0), error)


@dataclasses.dataclass(frozen=True)
class SinkhornSolver:
    """Entropic optimal transport with ott-jax's Sinkhorn, fully jit-compiled.

    Attributes:
      epsilon: entropic regularization, relative to the mean cost.
      threshold: stopping tolerance on the marginal error.
      max_iterations: iteration cap; ``converged`` reports whether it stopped earlier.
    """

    epsilon: float = 1e-3
    threshold: float = 1e-4
    max_iterations: int = 5000

    def __call__(self, cost: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> TransportResult:
        from ott.geometry import geometry
        from ott.solvers import linear

        geom = geometry.Geometry(cost_matrix=cost, epsilon=self.epsilon, relative_epsilon="mean")
        out = linear.solve(
            geom, a, b, threshold=self.threshold, max_iterations=self.max_iterations, lse_mode=True
        )
        valid = out.errors >= 0  # unused entries of the fixed-size error log are -1
        last = out.errors[jnp.maximum(jnp.sum(valid) - 1, 0)]
        return TransportResult(out.matrix, out.converged, out.n_iters, last)


def make_solver(
    solver: str | Solver,
    *,
    epsilon: float = 1e-3,
    max_iterations: int = 5000,
    threshold: float = 1e-4,
) -> Solver:
    """A solver from its name, or ``solver`` itself when it is already one.

    Args:
      solver: "exact" (:class:`ExactSolver`), "sinkhorn" (:class:`SinkhornSolver`) or
        any callable ``solver(cost, a, b) -> TransportResult``.
      epsilon, max_iterations, threshold: Sinkhorn settings (epsilon relative to the
        mean cost).

    Example:
      >>> plan = transport_problem(cost).solve(make_solver("sinkhorn", epsilon=1e-2)).plan
    """
    if isinstance(solver, str):
        if solver == "exact":
            return ExactSolver()
        if solver == "sinkhorn":
            return SinkhornSolver(
                epsilon=epsilon, threshold=threshold, max_iterations=max_iterations
            )
    elif callable(solver):
        return solver
    raise ValueError(f"unknown solver {solver!r}; choose 'exact', 'sinkhorn' or a solver object")


# ----------------------------------------------------------------------------- maps


def transport_map(plan: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """Intra-Fusion's map ``T' = P^T diag(1/a)``, (m, n): each source column sums to 1.

    Every source channel's mass is split among the targets (the reference's merge).
    """
    return plan.T / jnp.where(a > 0, a, 1.0)[None, :]


def barycentric_map(plan: jnp.ndarray) -> jnp.ndarray:
    """OTFusion's map, (m, n): ``P^T`` with each row divided by its mass, so it sums to 1.

    Target channel k becomes a convex combination of the source channels (the
    barycenter of what it receives); for an exact plan between equal uniform marginals
    it is a permutation matrix. A target receiving no mass gets a zero row.
    """
    mass = jnp.sum(plan, axis=0)
    return plan.T / jnp.where(mass > 0, mass, 1.0)[:, None]
