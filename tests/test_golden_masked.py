"""Parity with the released implementation in the same-shape masked form (as the
data-free sweep prunes): every case in ../shared/golden (apart from tests/test_golden.py so
that the two run on different workers)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import ifjax
from ifjax._tree import tree_get
from tests.golden import available, cases, pruner_for, setup

pytestmark = pytest.mark.skipif(not available(), reason="../shared/golden not present")


@functools.cache
def _forward(name: str):
    """The unpruned model's apply, compiled once: every masked case has its shapes."""
    golden, _, _ = setup(name)
    return jax.jit(golden.model.apply)


def _slots(value, axis: int, outer: int = 1, inner: int = 1) -> np.ndarray:
    """(n, ...): the n channel slices of ``axis`` (laid out as outer, n, inner)."""
    moved = np.moveaxis(np.asarray(value), axis, 0)
    n = moved.shape[0] // (outer * inner)
    return np.moveaxis(moved.reshape((outer, n, inner) + moved.shape[1:]), 1, 0)


def _channel_slices(group):
    """Every (path, axis, outer, inner) holding the group's channels."""
    layers = [(w.kernel, w.axis, w.outer, w.inner) for w in (*group.writers, *group.readers)]
    return layers + [(path, axis, 1, 1) for path, axis in group.channel_params]


@pytest.mark.parametrize("name,case_id", cases())
def test_golden_case_masked(name, case_id):
    """The same-shape form (``apply(..., masked=True)``, as the sweep prunes) gives the
    reference's logits; kept slots hold the physically pruned weights, pruned slots are
    zero (BatchNorm var 1: a BatchNorm that outputs 0)."""
    golden, groups, folded = setup(name)
    case = next(c for c in golden.cases if c["id"] == case_id)
    group = groups[case["group"]]
    pruner = pruner_for(case)
    plan = pruner.plan(folded, group)
    masked = pruner.apply(folded, group, plan, masked=True)
    assert jax.tree.map(np.shape, masked) == jax.tree.map(np.shape, folded)
    logits = np.asarray(_forward(name)(masked, golden.x))
    np.testing.assert_allclose(logits, golden.arrays[f"{case_id}/logits"], rtol=1e-4, atol=1e-5)
    physical = pruner.apply(folded, group, plan)
    keep = np.asarray(plan.keep)
    pruned = np.setdiff1d(np.arange(group.size), keep)
    assert len(keep) == ifjax.keep_count(group.size, case["sparsity"]) and len(pruned) > 0
    for path, axis, outer, inner in _channel_slices(group):
        slots = _slots(tree_get(masked, path), axis, outer, inner)
        kept = _slots(tree_get(physical, path), axis, outer, inner)
        np.testing.assert_allclose(slots[keep], kept, rtol=1e-5, atol=1e-6, err_msg=str(path))
        fill = 1.0 if path[-1] == "var" else 0.0
        np.testing.assert_array_equal(slots[pruned], fill, err_msg=str(path))
