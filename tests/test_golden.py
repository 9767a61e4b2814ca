"""Parity with the released implementation: every case in ../shared/golden."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import ifjax
from ifjax._tree import tree_get
from tests.golden import Golden, available

pytestmark = pytest.mark.skipif(not available(), reason="../shared/golden not present")

NAMES = ("vgg11_tiny", "resnet18_tiny")


@functools.cache
def _setup(name: str):
    golden = Golden(name)
    groups = ifjax.discover_groups(golden.model, golden.variables, golden.x)
    folded = ifjax.fold_batchnorm(golden.variables, groups)
    return golden, groups, folded


def _pruner(case, solver="exact"):
    # the golden "lamp" is the released code's scrambled LAMP
    importance = "lamp_released" if case["importance"] == "lamp" else case["importance"]
    if case["method"] == "default":
        return ifjax.default_pruning(case["sparsity"], importance)
    return ifjax.intra_fusion(
        case["sparsity"], importance, marginals=case["marginals"], solver=solver
    )


def _cases():
    if not available():
        return []
    return [(name, case["id"]) for name in NAMES for case in Golden(name).cases]


def prune_case(name: str, case_id: str, solver: str = "exact"):
    golden, groups, folded = _setup(name)
    case = next(c for c in golden.cases if c["id"] == case_id)
    group = groups[case["group"]]
    pruner = _pruner(case, solver)
    plan = pruner.plan(folded, group)
    variables = pruner.apply(folded, group, plan)
    logits = jax.jit(golden.model.for_variables(variables).apply)(variables, golden.x)
    return golden, case, variables, np.asarray(logits), plan


@pytest.mark.parametrize("name,case_id", _cases())
def test_golden_case(name, case_id):
    golden, case, variables, logits, _ = prune_case(name, case_id)
    for torch_param, shape in case["pruned_shapes"].items():
        path, _ = golden.flax_leaf(torch_param)
        value = np.asarray(tree_get(variables, path))
        assert sorted(value.shape) == sorted(shape), torch_param
        assert value.size == np.prod(shape)
    np.testing.assert_allclose(logits, golden.arrays[f"{case_id}/logits"], rtol=1e-4, atol=1e-5)
    if case["full_params"]:
        prefix = f"{case_id}/params/"
        stored = [k for k in golden.arrays.files if k.startswith(prefix)]
        assert stored
        for key in stored:
            torch_param = key[len(prefix) :]
            path, kind = golden.flax_leaf(torch_param)
            leaf = torch_param.rsplit(".", 1)[1]
            value = golden.to_torch_layout(tree_get(variables, path), kind, leaf)
            np.testing.assert_allclose(value, golden.arrays[key], atol=1e-5, err_msg=torch_param)


@functools.cache
def _forward(name: str):
    """The unpruned model's apply, compiled once: every masked case has its shapes."""
    golden, _, _ = _setup(name)
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


@pytest.mark.parametrize("name,case_id", _cases())
def test_golden_case_masked(name, case_id):
    """The same-shape form (``apply(..., masked=True)``, as the sweep prunes) gives the
    reference's logits; kept slots hold the physically pruned weights, pruned slots are
    zero (BatchNorm var 1: a BatchNorm that outputs 0)."""
    golden, groups, folded = _setup(name)
    case = next(c for c in golden.cases if c["id"] == case_id)
    group = groups[case["group"]]
    pruner = _pruner(case)
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


def test_unpruned_logits_match_reference():
    for name in NAMES:
        golden = Golden(name)
        logits = golden.model.apply(golden.variables, golden.x)
        np.testing.assert_allclose(logits, golden.arrays["base_logits"], rtol=1e-5, atol=1e-6)


def test_folded_model_matches_reference_base():
    for name in NAMES:
        golden, _, folded = _setup(name)
        logits = golden.model.apply(folded, golden.x)
        # identity BatchNorms keep eps=1e-5: ~1e-6 relative per layer
        np.testing.assert_allclose(logits, golden.arrays["base_logits"], rtol=1e-4, atol=1e-5)
