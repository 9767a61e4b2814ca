"""reports/table1_scale.py: the norm matching keeps the network of training mode (up to the
logits' scale) with Default's scales; the report's numbers come from its rows."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.registry import create_model, init_variables

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "reports"))
    spec = importlib.util.spec_from_file_location(
        "table1_scale", ROOT / "reports" / "table1_scale.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_vgg():
    model = create_model("vgg11_bn", 10, 0.125)
    variables = init_variables(model, 0, (1, 32, 32, 3))
    # trained-like BatchNorm statistics, so that folding does something
    keys = iter(jax.random.split(jax.random.key(1), 64))
    stats = jax.tree.map(
        lambda x: jax.random.uniform(next(keys), x.shape, minval=0.5, maxval=2.0),
        variables["batch_stats"],
    )
    return model, {**variables, "batch_stats": stats}


def _train_logits(model, variables, x):
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits


def test_norm_matching_keeps_the_training_network_with_defaults_scales(study, tiny_vgg):
    model, variables = tiny_vgg
    before = jax.tree.map(np.array, variables)
    pruned_model, released = study.prune_variant(model, variables, 0.8, "intra_fusion")
    _, default = study.prune_variant(model, variables, 0.8, "default")
    _, matched = study.prune_variant(model, variables, 0.8, "norm_matched")
    _, classifier = study.prune_variant(model, variables, 0.8, "classifier_matched")
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # inputs untouched
    # the released merge inflates the kernels (coefficients summing to n/m = 5 here)
    ratios = study.kernel_norm_ratios(released, default)
    last = study.classifier(released)
    assert len(ratios) == 9 and max(ratios.values()) > 2 and ratios[last] > 2
    assert study.kernel_norm_ratios(matched, default) == pytest.approx(
        dict.fromkeys(ratios, 1.0), rel=1e-5
    )
    only = study.kernel_norm_ratios(classifier, default)
    assert only == pytest.approx(ratios | {last: 1.0}, rel=1e-5)
    # training mode: BatchNorm undoes each convolution's scale; the logits scale with the
    # classifier's factor (up to BatchNorm's epsilon)
    x = jax.random.normal(jax.random.key(2), (16, 32, 32, 3))
    factor = ratios[last]
    np.testing.assert_allclose(
        _train_logits(pruned_model, matched, x) * factor,
        _train_logits(pruned_model, released, x),
        rtol=2e-3,
        atol=2e-3 * float(jnp.abs(_train_logits(pruned_model, released, x)).max()),
    )
    # row averaging is another network: the groups are pruned one after another, so the
    # later groups' scores and plans see the averaged rows
    _, averaged = study.prune_variant(model, variables, 0.8, "row_average")
    assert study.kernel_norm_ratios(averaged, default)[last] == pytest.approx(ratios[last], rel=0.5)
    with pytest.raises(ValueError, match="variant must be one of"):
        study.prune_variant(model, variables, 0.8, "rescaled")


def test_summary_and_findings_are_computed_from_the_rows(study):
    def row(variant, seed, top1, loss, ratios, width=0.25):
        return dict(
            variant=variant, sparsity=0.8, seed=seed, width=width, pruned_top1=10.0,
            finetuned_top1=top1,
            train_loss=loss, norm_ratios=dict(zip(("conv", "dense"), ratios, strict=True)),
            classifier_ratio=ratios[1],
            curve=[[78, top1 - 5, loss + 0.2], [156, top1, loss]],
        )  # fmt: skip

    rows = [
        row("default", 1, 48.0, 1.5, [1.0, 1.0]),
        row("default", 2, 50.0, 1.6, [1.0, 1.0]),
        row("intra_fusion", 1, 34.0, 1.9, [6.0, 3.5]),
        row("intra_fusion", 2, 36.0, 1.8, [6.5, 3.9]),
        row("norm_matched", 1, 47.0, 1.4, [1.0, 1.0]),
    ]
    fast = [
        row("default_lr10", 1, 41.0, 1.6, [1.0, 1.0]),
        row("intra_fusion_lr10", 1, 37.0, 1.7, [6.0, 3.5]),
    ]
    table = study.summary(rows + fast)
    # each learning rate against Default at that rate
    assert table[(0.8, "intra_fusion_lr10")]["gain"] == -4.0
    released = table[(0.8, "intra_fusion")]
    assert released["finetuned_top1"] == 35.0 and released["gain"] == -14.0
    assert released["spread"] == 2.0 and released["max_ratio"] == pytest.approx(6.25)
    assert released["classifier_ratio"] == pytest.approx(3.7)
    assert table[(0.8, "norm_matched")]["gain"] == -2.0
    text = "\n".join(study.findings(table))
    assert "up to 6.2x as large as Default's at 80% (the classifier's 3.7x)" in text
    assert "as released -14.00; rows averaged -; norms matched -2.00" in text
    assert "IF, norms matched 1.400, IF, classifier matched -." in text
    assert (
        "Intra-Fusion as released gains -4.00. At 80% it takes Default from 49.00 to 41.00%" in text
    )
    assert "from 35.00 to 37.00%." in text  # Intra-Fusion gained 2 points: no verdict
    assert math.isnan(table.get((0.8, "row_average"), {"gain": float("nan")})["gain"])
    # the full-width part, from its own rows, in a section of its own
    full = [
        row("default", 1, 40.0, 1.5, [1.0, 1.0], 1.0),
        row("norm_matched", 1, 43.5, 1.4, [1.0, 1.0], 1.0),
    ]
    reproduce = sys.modules["reproduce"]
    plot = reproduce.REPORTS / "figures" / "table1_scale.png"
    text = study.markdown(rows + full, {0.25: {"test_top1": 81.0}, 1.0: {"test_top1": 75.0}}, plot)
    assert "(81.00% on the 10,000 test images" in text and "(75.00%;" in text
    reduced, _, wide = text.partition("## At the paper's width")
    assert (
        "| 80% | Intra-Fusion (released) | 6.25 | 3.70 | 10.00 | 35.00 | -14.00 | 2.00 |" in reduced
    )
    assert (
        "| 80% | IF, norms matched | 1.00 | 1.00 | 10.00 | 43.50 | +3.50 | 0.00 | 1.400 |" in wide
    )
    assert "as released -; norms matched +3.50." in wide
