"""Channel importance (one score per channel of a group), as the reference computes it.

For every layer of the group a per-channel vector is computed, vectors of the wrong
length are left out (l1/l2/taylor skip a Dense that reads a flattened feature map), the
vectors are averaged over layers and divided by their mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ifjax._channels import group_reader_rows, group_size, writer_rows
from ifjax._graph import Group, resolve_segments
from ifjax._model import as_variables, view_and_input
from ifjax._tree import tree_get

__all__ = [
    "IMPORTANCES",
    "PAPER_IMPORTANCES",
    "TAYLOR_BATCHES",
    "TAYLOR_BATCH_SIZE",
    "accumulate_gradients",
    "group_importance",
    "lamp_transform",
    "paper_scoring",
]

IMPORTANCES = ("l1", "l2", "lamp", "lamp_released", "taylor", "random")
# The importance behind each of the paper's names for its numbers: the paper's "lamp"
# numbers come from the released code's scrambled LAMP ("lamp_released").
PAPER_IMPORTANCES = {"l1": "l1", "taylor": "taylor", "lamp": "lamp_released"}
# The reference's taylor: loss gradients summed over this many batches of this many
# (shuffled, augmented) training images (see accumulate_gradients).
TAYLOR_BATCHES = 5
TAYLOR_BATCH_SIZE = 128


def paper_scoring(importance: str) -> str:
    """The importance that scores ``importance`` as the paper's numbers were scored.

    Only "lamp" differs: the paper's LAMP numbers come from the released code's
    scrambled LAMP, ``"lamp_released"``; every other name scores itself.

    Example:
      >>> paper_scoring("lamp"), paper_scoring("l1")
      ('lamp_released', 'l1')
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose from {IMPORTANCES}")
    return PAPER_IMPORTANCES.get(importance, importance)


def _per_layer(variables, group, n, row_score, include_flattened: bool) -> list[jnp.ndarray]:
    vectors = [row_score(writer_rows(variables, w), w.kernel) for w in group.writers]
    for r, rows in zip(group.readers, group_reader_rows(variables, group, n), strict=True):
        if include_flattened or not r.flattened:
            vectors.append(row_score(rows, r.kernel))
    return vectors


def _grad_rows(gradients, group, n):
    rows = {w.kernel: writer_rows(gradients, w) for w in group.writers}
    readers = group_reader_rows(gradients, group, n)
    rows.update({r.kernel: x for r, x in zip(group.readers, readers, strict=True)})
    return rows


def lamp_transform(scores: jnp.ndarray, released: bool = False) -> jnp.ndarray:
    """LAMP: sort descending, divide each sorted value by the cumulative sum.

    Args:
      scores: (n,) non-negative.
      released: reproduce the released code, which maps the transformed values back with
        the sort permutation itself (``score[i] = t[order[i]]``) instead of its inverse.
    """
    order = jnp.argsort(-scores, stable=True)
    ranked = scores[order]
    transformed = ranked / jnp.cumsum(ranked)
    if released:
        return transformed[order]
    return jnp.zeros_like(scores).at[order].set(transformed)


def group_importance(
    variables: Mapping[str, Any],
    group: Group,
    importance: str = "l1",
    *,
    gradients: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
) -> jnp.ndarray:
    """Importance of every channel of a group, (n,), normalized to mean 1.

    Args:
      variables: model variables (folded, as in the reference), or an NNX module.
      group: the group.
      importance: "l1" / "l2" (sum of |w|^p over each slice, no root, no bias), "lamp"
        (correct LAMP over L2 norms and BatchNorm |gamma|), "lamp_released" (the
        released code's scrambled LAMP, used by the paper), "taylor" (sum |w * dL/dw|;
        needs ``gradients`` from :func:`accumulate_gradients`) or "random" (needs ``key``).
      gradients: a tree like ``variables`` holding accumulated gradients (taylor only).
      key: PRNG key (random only).
    """
    variables, _ = as_variables(variables)
    group = resolve_segments(variables, group)
    n = group_size(variables, group)
    if importance in ("l1", "l2"):
        p = 1 if importance == "l1" else 2
        vectors = _per_layer(
            variables, group, n, lambda rows, _: jnp.sum(jnp.abs(rows) ** p, 1), False
        )
    elif importance in ("lamp", "lamp_released"):
        vectors = _per_layer(
            variables, group, n, lambda rows, _: jnp.linalg.norm(rows, axis=1), True
        )
        for w in group.writers:
            if w.batchnorm is not None:
                scale = tree_get(variables, w.batchnorm.scale) if w.batchnorm.scale else None
                vectors.append(jnp.abs(scale) if scale is not None else jnp.ones((n,)))
    elif importance == "taylor":
        if gradients is None:
            raise ValueError("importance='taylor' needs gradients (see accumulate_gradients)")
        grads = _grad_rows(gradients, group, n)
        vectors = _per_layer(
            variables, group, n, lambda rows, path: jnp.sum(jnp.abs(rows * grads[path]), 1), False
        )
    elif importance == "random":
        if key is None:
            raise ValueError("importance='random' needs a PRNG key")
        return jax.random.uniform(key, (n,))
    else:
        raise ValueError(f"unknown importance {importance!r}; choose one of {IMPORTANCES}")
    scores = jnp.mean(jnp.stack(vectors), axis=0)
    scores = scores / jnp.mean(scores)
    if importance.startswith("lamp"):
        scores = lamp_transform(scores, released=importance == "lamp_released")
    return scores


def accumulate_gradients(
    model: Any,
    *args: Any,
    loss_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Sums the loss gradients over batches, as the reference does for Taylor importance.

    Linen: ``accumulate_gradients(model, variables, batches)``; NNX:
    ``accumulate_gradients(module, batches)`` (in evaluation mode). The model runs in
    evaluation mode (BatchNorm uses its running statistics; pass ``apply_kwargs`` such
    as ``{"train": False}`` where that is not the default); gradients of the mean
    cross-entropy of each batch are summed without reset.

    Args:
      model: Flax Linen module, or NNX module.
      *args: the Linen module's variables (folded, as in the reference), then
        ``batches``: an iterable of ``(images, integer labels)``; the reference uses
        ``TAYLOR_BATCHES`` (5) of ``TAYLOR_BATCH_SIZE`` (128).
      loss_fn: ``loss_fn(logits, labels) -> scalar``; default mean cross-entropy.
      apply_kwargs: Linen: extra ``model.apply`` arguments.
      call_kwargs: NNX: extra call arguments.

    Returns:
      ``{"params": gradients}`` shaped like the variables' ``params`` (for NNX, like
      the ``params`` of the tree the other functions see).
    """
    *model_args, batches = args
    view, _ = view_and_input(model, (*model_args, None), apply_kwargs, call_kwargs)
    if loss_fn is None:
        loss_fn = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(
            logits, y
        ).mean()
    variables = view.variables
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def grad(params, x, y):
        return jax.grad(lambda p: loss_fn(view.apply({"params": p, **rest}, x), y))(params)

    total = None
    for x, y in batches:
        g = grad(variables["params"], x, y)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    if total is None:
        raise ValueError("accumulate_gradients got no batches")
    return {"params": total}
