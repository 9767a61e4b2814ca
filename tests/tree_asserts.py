"""Small assertions over variable trees."""

from __future__ import annotations

import jax
import numpy as np


def assert_trees_equal(a, b, **tolerance):
    """Same structure and values (exactly, or within numpy tolerances)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if tolerance:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def copy_tree(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)
