"""The optimal-transport problem of one group: cost, marginals, solvers, transport map.

Follows ott-jax's split: a cost geometry (normalized features, L1 distance), a problem
(marginals), a solver behind one interface (exact network simplex, or entropic Sinkhorn
from ott-jax), and the transport map derived from the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ExactSolver",
    "SinkhornSolver",
    "TransportResult",
    "l1_cost",
    "marginals",
    "normalize_rows",
    "transport_map",
]


def normalize_rows(features: jnp.ndarray) -> jnp.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (the reference gives NaN)."""
    norm = jnp.linalg.norm(features, axis=1, keepdims=True)
    return features / jnp.where(norm > 0, norm, 1.0)


def l1_cost(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Pairwise L1 distances (n, m) between rows of x (n, D) and y (m, D).

    Computed row by row so memory stays O(m * D) for wide layers.
    """
    return jax.lax.map(lambda row: jnp.sum(jnp.abs(y - row), axis=1), x, batch_size=16)


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


@dataclasses.dataclass(frozen=True)
class TransportResult:
    """A transport plan (n, m) and how the solver got there."""

    plan: jnp.ndarray
    converged: jnp.ndarray
    iterations: jnp.ndarray
    marginal_error: jnp.ndarray


jax.tree_util.register_dataclass(
    TransportResult,
    data_fields=["plan", "converged", "iterations", "marginal_error"],
    meta_fields=[],
)


class Solver(Protocol):
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


def transport_map(plan: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """The reference's map ``T' = P^T diag(1/a)``, (m, n): each source column sums to 1."""
    return plan.T / jnp.where(a > 0, a, 1.0)[None, :]
