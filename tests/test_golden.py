"""Parity with the released implementation: every case in ../shared/golden."""

from __future__ import annotations

import numpy as np
import pytest

from ifjax._tree import tree_get
from tests.golden import NAMES, Golden, available, cases, prune_case, setup

pytestmark = pytest.mark.skipif(not available(), reason="../shared/golden not present")


@pytest.mark.parametrize("name,case_id", cases())
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


def test_unpruned_logits_match_reference():
    for name in NAMES:
        golden = Golden(name)
        logits = golden.model.apply(golden.variables, golden.x)
        np.testing.assert_allclose(logits, golden.arrays["base_logits"], rtol=1e-5, atol=1e-6)


def test_folded_model_matches_reference_base():
    for name in NAMES:
        golden, _, folded = setup(name)
        logits = golden.model.apply(folded, golden.x)
        # identity BatchNorms keep eps=1e-5: ~1e-6 relative per layer
        np.testing.assert_allclose(logits, golden.arrays["base_logits"], rtol=1e-4, atol=1e-5)
