"""ifjax.recalibrate_batchnorm: new running statistics from data, for our models and for
user models (Linen with axis_name, NNX), checked against statistics computed here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ifjax
from models.registry import create_model, init_variables
from tests import clients


def _shifted(variables):
    """The same model with running statistics that describe nothing (as after fusing)."""
    stats = jax.tree.map(lambda a: a * 3.0 + 2.0, variables["batch_stats"])
    return {**variables, "batch_stats": stats}


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_one_batch_makes_evaluation_equal_training_mode(name):
    """With one batch, the recalibrated statistics are that batch's, so every BatchNorm
    in evaluation mode normalises exactly as in training mode: same logits."""
    model = create_model(name, 10, 0.125)
    variables = init_variables(model, 0)
    x = jax.random.normal(jax.random.key(1), (48, 32, 32, 3))
    stale = _shifted(variables)
    before = jax.tree.map(np.array, stale)
    recalibrated = ifjax.recalibrate_batchnorm(model, stale, [x])
    trained_mode, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    evaluated = model.apply(recalibrated, x, train=False)
    np.testing.assert_allclose(evaluated, trained_mode, rtol=1e-4, atol=1e-4)
    assert not np.allclose(model.apply(stale, x, train=False), trained_mode, atol=1e-2)
    jax.tree.map(np.testing.assert_array_equal, stale, before)  # input untouched
    jax.tree.map(np.testing.assert_array_equal, recalibrated["params"], variables["params"])


def test_statistics_are_batch_size_weighted_averages_of_the_batches():
    """The first BatchNorm's new mean and variance, computed here from the convolution's
    output of each batch (numpy: mean and biased variance over N, H, W)."""
    model = create_model("vgg11_bn", 10, 0.125)
    variables = init_variables(model, 0)
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(n, 32, 32, 3)).astype(np.float32) for n in (40, 24, 8)]
    recalibrated = ifjax.recalibrate_batchnorm(model, _shifted(variables), batches)
    means, variances, sizes = [], [], []
    for x in batches:
        _, state = model.apply(
            variables,
            x,
            train=True,
            capture_intermediates=True,
            mutable=["intermediates", "batch_stats"],
        )
        conv = np.asarray(state["intermediates"]["conv0"]["__call__"][0], np.float64)
        means.append(conv.mean(axis=(0, 1, 2)))
        variances.append(conv.var(axis=(0, 1, 2)))
        sizes.append(len(x))
    weights = np.array(sizes)[:, None] / sum(sizes)
    bn0 = recalibrated["batch_stats"]["bn0"]
    np.testing.assert_allclose(
        bn0["mean"], (weights * np.array(means)).sum(0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(bn0["var"], (weights * np.array(variances)).sum(0), rtol=1e-4)


def test_models_of_equal_widths_share_one_compiled_pass():
    """A sweep recalibrates many models; those of the same widths (Default and
    Intra-Fusion of one cell, k replicas) compile the train-mode pass once."""
    from ifjax._batchnorm import _train_mode_batch_stats

    model = create_model("vgg11_bn", 10, 0.0625)
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    first = ifjax.recalibrate_batchnorm(model, init_variables(model, 0), [x])
    compiled = _train_mode_batch_stats._cache_size()
    second = ifjax.recalibrate_batchnorm(model, init_variables(model, 1), [x, x])
    assert _train_mode_batch_stats._cache_size() == compiled
    assert not np.allclose(first["batch_stats"]["bn0"]["var"], second["batch_stats"]["bn0"]["var"])


def test_linen_model_with_axis_name_and_dict_batches():
    """flax's examples ResNet: BatchNorm(axis_name="batch"), train=True by default."""
    model, variables, x = clients.linen_resnet()
    x = jnp.concatenate([x, x[::-1] * 0.5])
    with pytest.raises(NameError):  # the axis has to be bound to run in training mode
        ifjax.recalibrate_batchnorm(model, variables, [x])
    recalibrated = ifjax.recalibrate_batchnorm(
        model, _shifted(variables), [{"image": x}], axis_name="batch"
    )
    trained_mode, _ = jax.vmap(
        lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"]),
        axis_name="batch",
    )(x[None])
    evaluated = model.apply(recalibrated, x, train=False)
    np.testing.assert_allclose(evaluated, trained_mode[0], rtol=1e-4, atol=1e-4)


def test_nnx_module_any_momentum():
    """An NNX ResNet whose BatchNorms have another momentum: a new module in evaluation
    mode, evaluating as the training-mode forward of the batch; the input untouched."""
    module, x = clients.nnx_resnet()
    for _, layer in nnx.iter_modules(module):
        if isinstance(layer, nnx.BatchNorm):
            layer.momentum = 0.7
            layer.mean[...] = layer.mean[...] + 5.0
    x = jnp.concatenate([x, x * 2.0])
    stale_mean = np.array(module.stem_bn.mean[...])
    recalibrated = ifjax.recalibrate_batchnorm(module, [x[:10], x[10:]])
    np.testing.assert_array_equal(module.stem_bn.mean[...], stale_mean)
    assert recalibrated is not module and recalibrated.stem_bn.use_running_average
    trained_mode = nnx.clone(module)
    trained_mode.train()
    expected_stem = trained_mode.stem(x)
    np.testing.assert_allclose(
        recalibrated.stem_bn.mean[...], expected_stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    single = ifjax.recalibrate_batchnorm(module, [x])
    np.testing.assert_allclose(single(x), trained_mode(x), rtol=1e-4, atol=1e-4)


def test_nnx_cnn_of_the_docs_with_dropout():
    module, x = clients.nnx_cnn()
    recalibrated = ifjax.recalibrate_batchnorm(module, [x, x + 0.1])
    assert recalibrated.batch_norm1.use_running_average
    assert np.all(np.isfinite(recalibrated(x)))
    assert not np.allclose(recalibrated.batch_norm1.mean[...], module.batch_norm1.mean[...])


def test_errors_name_the_problem():
    model = create_model("vgg11_bn", 10, 0.125)
    variables = init_variables(model, 0)
    x = np.zeros((4, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="at least one batch"):
        ifjax.recalibrate_batchnorm(model, variables, [])
    with pytest.raises(ValueError, match="momentum 1"):
        ifjax.recalibrate_batchnorm(model, variables, [x], apply_kwargs={"train": False})
    with pytest.raises(ValueError, match="no batch_stats"):
        ifjax.recalibrate_batchnorm(model, {"params": variables["params"]}, [x])
    module, _ = clients.nnx_resnet()
    with pytest.raises(ValueError, match="NNX module takes"):
        ifjax.recalibrate_batchnorm(module, variables, [x])
