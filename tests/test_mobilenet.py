"""Tests of models/mobilenet.py (the CIFAR MobileNetV2) and of the XLA:CPU lowering of its
depthwise convolutions (models.layers.install_depthwise_lowering)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ifjax
from models import MobileNetV2, mobilenetv2
from models.layers import depthwise_taps
from models.mobilenet import CIFAR_CONFIG, make_divisible
from models.registry import build_model, create_model, init_variables, model_spec
from train import cli, jobs

# Stem 16; a block of expansion 1 (16 -> 8), two of expansion 2 (8 -> 16, then a residual
# one) and a strided one (16 -> 16, no residual): every kind of block.
TINY = dict(stem=16, config=((1, 8, 1, 1), (2, 16, 2, 1), (2, 16, 1, 2)), head=16)


def _tiny(num_classes: int = 10) -> MobileNetV2:
    return mobilenetv2(num_classes=num_classes, **TINY)


def _images(n: int = 2, size: int = 16, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def _shapes(tree):
    return jax.tree.map(np.shape, tree)


def _init_shapes(model, input_shape=(1, 16, 16, 3)):
    """The shapes of ``init_variables(model, ...)``, traced only."""
    return _shapes(jax.eval_shape(lambda: init_variables(model, 0, input_shape)))


def _randomized(variables, seed: int = 1):
    """Random values everywhere (signed kernels and BatchNorm shifts, positive scales and
    variances), so that every channel matters in comparisons."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        low, high = {"kernel": (-1, 1), "scale": (0.5, 1.5), "var": (0.5, 1.5)}.get(
            name, (-0.5, 0.5)
        )
        return jnp.asarray(rng.uniform(low, high, np.shape(leaf)), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, variables)


# ----------------------------------------------------------------------------- factory


def test_factory_builds_the_cifar_mobilenetv2():
    model = mobilenetv2()
    assert model.stem == 32 and model.head == 1280 and model.num_classes == 10
    assert len(model.hidden) == sum(n for _, _, n, _ in CIFAR_CONFIG) == 17
    assert model.outs == (16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320)
    assert model.hidden[:4] == (32, 96, 144, 144)  # input width x expansion
    assert model.strides == (1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
    assert model.expand == (False,) + (True,) * 16
    # A residual wherever a block keeps its stride and width.
    assert [i for i, r in enumerate(model.residual) if r] == [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]
    variables = jax.eval_shape(lambda: init_variables(model, 0))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == 2_236_682
    assert "conv_expand" not in variables["params"]["block0"]
    assert variables["params"]["block3"]["conv_dw"]["kernel"].shape == (3, 3, 1, 144)


def test_factory_widths_are_multiples_of_8():
    half = mobilenetv2(num_classes=100, width_multiplier=0.5)
    assert half.stem == 16 and half.head == 1280  # the head only grows (width > 1)
    assert half.outs[:4] == (8, 16, 16, 16) and half.hidden[:3] == (16, 48, 96)
    assert all(w % 8 == 0 for w in (half.stem, *half.outs))
    assert mobilenetv2(width_multiplier=1.5).head == 1920
    assert [make_divisible(v) for v in (1, 4, 12, 13.5, 20, 36)] == [8, 8, 16, 16, 24, 40]
    shallow = _tiny()
    assert (shallow.stem, shallow.hidden, shallow.outs, shallow.head) == (
        16,
        (16, 16, 32, 32),
        (8, 16, 16, 16),
        16,
    )
    assert shallow.residual == (False, False, True, False)


def test_forward_shapes_and_layers():
    model = _tiny(num_classes=7)
    x = _images(3, 32)
    variables = init_variables(model, 0, x.shape)
    assert set(variables) == {"params", "batch_stats"}
    assert model.apply(variables, x).shape == (3, 7)
    params = variables["params"]
    assert set(params["block0"]) == {"conv_dw", "bn_dw", "conv_project", "bn_project"}
    assert set(params["block1"]) == {
        "conv_expand",
        "bn_expand",
        "conv_dw",
        "bn_dw",
        "conv_project",
        "bn_project",
    }
    assert params["block2"]["conv_dw"]["kernel"].shape == (3, 3, 1, 32)
    assert params["block2"]["conv_project"]["kernel"].shape == (1, 1, 32, 16)
    assert params["conv_head"]["kernel"].shape == (1, 1, 16, 16)
    assert "bias" not in params["conv_init"]  # BN follows every convolution
    assert params["classifier"]["kernel"].shape == (16, 7)
    # The strided block halves the map: its depthwise output is 16x16 for a 32x32 input.
    _, state = model.apply(
        variables, x, capture_intermediates=lambda m, _: m.name == "conv_dw", mutable=True
    )
    assert state["intermediates"]["block3"]["conv_dw"]["__call__"][0].shape == (3, 16, 16, 32)
    assert state["intermediates"]["block2"]["conv_dw"]["__call__"][0].shape == (3, 32, 32, 32)


def test_train_mode_updates_batch_stats():
    model = _tiny()
    x = _images(4)
    variables = init_variables(model, 0, x.shape)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert _shapes(updates["batch_stats"]) == _shapes(variables["batch_stats"])
    mean = updates["batch_stats"]["block1"]["bn_dw"]["mean"]
    assert not np.allclose(mean, variables["batch_stats"]["block1"]["bn_dw"]["mean"])
    # Train mode normalizes by the batch: logits differ from the running-average ones.
    assert not np.allclose(logits, model.apply(variables, x, train=False), atol=1e-4)


def test_bad_widths_are_named():
    model = _tiny()
    with pytest.raises(ValueError, match="differ in depth"):
        init_variables(model.clone(strides=(1, 1, 2)), 0, (1, 16, 16, 3))
    with pytest.raises(ValueError, match="block0: a block without expand convolution"):
        init_variables(model.clone(hidden=(6, 16, 32, 32)), 0, (1, 16, 16, 3))


# ---------------------------------------------------------------- pruned widths and specs


def _drop_hidden(variables, block: str, keep: np.ndarray):
    """Keeps the hidden channels ``keep`` of a block with expand convolution."""
    variables = jax.tree.map(lambda a: a, variables)  # a copy of the nested dicts
    for collection in ("params", "batch_stats"):
        b = variables[collection][block]
        for name in ("bn_expand", "bn_dw"):
            b[name] = {k: v[keep] for k, v in b[name].items()}
    p = variables["params"][block]
    p["conv_expand"] = {"kernel": p["conv_expand"]["kernel"][..., keep]}
    p["conv_dw"] = {"kernel": p["conv_dw"]["kernel"][..., keep]}
    p["conv_project"] = {"kernel": p["conv_project"]["kernel"][:, :, keep, :]}
    return variables


def _drop_head(variables, keep: np.ndarray):
    variables = jax.tree.map(lambda a: a, variables)
    p = variables["params"]
    p["conv_head"] = {"kernel": p["conv_head"]["kernel"][..., keep]}
    for collection in ("params", "batch_stats"):
        bn = variables[collection]["bn_head"]
        variables[collection]["bn_head"] = {k: v[keep] for k, v in bn.items()}
    p["classifier"] = dict(p["classifier"], kernel=p["classifier"]["kernel"][keep])
    return variables


def test_for_variables_rebuilds_hand_pruned_models():
    model = _tiny()
    x = _images(2)
    variables = _randomized(init_variables(model, 0, x.shape))
    keep1, keep2, keep_head = np.array([0, 3, 4, 9, 15]), np.arange(0, 32, 3), np.arange(5)
    pruned = _drop_head(
        _drop_hidden(_drop_hidden(variables, "block1", keep1), "block2", keep2), keep_head
    )
    small = model.for_variables(pruned)
    assert small == model.clone(hidden=(16, 5, 11, 32), head=5)
    assert _init_shapes(small, x.shape) == _shapes(pruned)
    assert small.for_variables(pruned) == small
    # Removing hidden channels is the same as zeroing what the project convolution reads
    # from them (and the classifier rows of removed head channels).
    masked = jax.tree.map(lambda a: a, variables)
    for block, keep in (("block1", keep1), ("block2", keep2)):
        kernel = masked["params"][block]["conv_project"]["kernel"]
        drop = np.setdiff1d(np.arange(kernel.shape[2]), keep)
        masked["params"][block]["conv_project"]["kernel"] = kernel.at[:, :, drop, :].set(0)
    rows = masked["params"]["classifier"]["kernel"]
    masked["params"]["classifier"]["kernel"] = rows.at[keep_head.size :].set(0)
    np.testing.assert_allclose(small.apply(pruned, x), model.apply(masked, x), rtol=1e-4, atol=1e-4)


def test_for_variables_follows_the_stem_through_a_block_without_expand():
    """A block of expansion 1 has the width of its input: pruning the stem prunes its
    depthwise convolution, and the model's hidden width follows."""
    model = _tiny()
    variables = _randomized(init_variables(model, 0, (1, 16, 16, 3)))
    keep = np.array([1, 2, 6, 11, 15])
    pruned = jax.tree.map(lambda a: a, variables)
    p = pruned["params"]
    p["conv_init"] = {"kernel": p["conv_init"]["kernel"][..., keep]}
    p["block0"]["conv_dw"] = {"kernel": p["block0"]["conv_dw"]["kernel"][..., keep]}
    p["block0"]["conv_project"] = {"kernel": p["block0"]["conv_project"]["kernel"][:, :, keep]}
    for tree in (p, pruned["batch_stats"]):
        for bn in ("bn_init", "block0/bn_dw"):
            *parents, name = bn.split("/")
            node = tree[parents[0]] if parents else tree
            node[name] = {k: v[keep] for k, v in node[name].items()}
    small = model.for_variables(pruned)
    assert small == model.clone(stem=5, hidden=(5, *model.hidden[1:]))
    assert _init_shapes(small) == _shapes(pruned)
    # Equal to the dense model with what block0 projects from the removed channels zeroed.
    masked = jax.tree.map(lambda a: a, variables)
    kernel = masked["params"]["block0"]["conv_project"]["kernel"]
    drop = np.setdiff1d(np.arange(16), keep)
    masked["params"]["block0"]["conv_project"]["kernel"] = kernel.at[:, :, drop].set(0)
    x = _images(2)
    np.testing.assert_allclose(small.apply(pruned, x), model.apply(masked, x), rtol=1e-4, atol=1e-4)


def test_spec_round_trip_through_the_registry():
    model = create_model("mobilenetv2", num_classes=100, width_multiplier=0.5)
    assert model == mobilenetv2(num_classes=100, width_multiplier=0.5)
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec["name"] == "MobileNetV2"
    assert spec["fields"]["outs"][:3] == [8, 16, 16] and spec["fields"]["expand"][0] is False
    assert build_model(spec) == model
    pruned = _tiny().clone(stem=5, hidden=(5, 7, 9, 30), outs=(6, 12, 12, 11), head=13)
    rebuilt = build_model(json.loads(json.dumps(model_spec(pruned))))
    assert rebuilt == pruned and type(rebuilt) is MobileNetV2
    shapes = jax.eval_shape(lambda: init_variables(pruned, 0, (1, 16, 16, 3)))
    assert pruned.for_variables(shapes) == rebuilt


def test_ifjax_prunes_it_into_the_model_for_its_variables():
    """ifjax's groups (depthwise kernels with the expand convolutions they follow) prune
    to the variables of ``for_variables``' model, as for the other models."""
    model = _tiny()
    x = _images(2)
    variables = init_variables(model, 0, x.shape)
    groups = tuple(ifjax.discover_groups(model, variables, x))
    depthwise = {w.kernel for g in groups for w in g.writers if w.kernel[-2] == "conv_dw"}
    assert len(depthwise) == 4  # each depthwise kernel joins a group as a writer
    widths = {g.index: max(1, g.size // 2) for g in groups}
    small, pruned, _ = ifjax.prune(model, variables, groups, widths=widths, example_input=x)
    assert small == model.for_variables(pruned)
    assert (small.stem, small.hidden, small.outs, small.head) == (
        8,
        (8, 8, 16, 16),
        (4, 8, 8, 8),
        8,
    )
    assert _init_shapes(small, x.shape) == _shapes(pruned)


# ------------------------------------------------------------------------ command line


def test_train_command_reaches_the_job(monkeypatch):
    seen = {}
    monkeypatch.setattr(jobs, "train", lambda **kw: seen.setdefault("train", kw) and None)
    monkeypatch.setattr(cli, "_report_fit", lambda result: None)
    argv = ["--compilation-cache", "off", "train", "--model", "mobilenetv2", "--workdir", "w"]
    assert cli.main(argv + ["--width-multiplier", "0.5", "--schedule", "fast"]) == 0
    train = seen["train"]
    assert (train["model"], train["width_multiplier"], train["schedule"]) == (
        "mobilenetv2",
        0.5,
        "fast",
    )


# ------------------------------------------------------------- the depthwise lowering


def _compiled_with(implementation: str, function, *args):
    """``function`` jitted afresh and run with ``IFJAX_CONV`` set while it compiles."""
    before = os.environ.get("IFJAX_CONV")
    os.environ["IFJAX_CONV"] = implementation
    try:
        return jax.jit(function)(*args)
    finally:
        if before is None:
            os.environ.pop("IFJAX_CONV")
        else:
            os.environ["IFJAX_CONV"] = before


@pytest.mark.parametrize(
    "shape, size, stride, padding, numbers",
    [
        ((4, 9, 9, 6), 3, 1, ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
        ((4, 9, 9, 6), 3, 2, ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
        ((4, 8, 8, 6), 3, 2, "SAME", ("NHWC", "HWIO", "NHWC")),
        ((3, 10, 7, 5), 7, 1, ((3, 3), (3, 3)), ("NHWC", "HWIO", "NHWC")),
        ((3, 7, 6, 10), 5, 2, ((2, 1), (0, 2)), ("NCHW", "OIHW", "NCHW")),
    ],
)
def test_depthwise_lowering_equals_xla(shape, size, stride, padding, numbers):
    rng = np.random.default_rng(0)
    channels = shape[numbers[0].index("C")]
    kernel_shape = {"HWIO": (size, size, 1, channels), "OIHW": (channels, 1, size, size)}
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape[numbers[1]]), jnp.float32)

    def conv(x, kernel):
        return lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            padding,
            dimension_numbers=numbers,
            feature_group_count=channels,
        )

    def grads(x, kernel):
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=(0, 1))(x, kernel)

    if jax.default_backend() == "cpu":
        assert "convolution" not in jax.jit(conv).lower(x, kernel).as_text()
    for function in (conv, grads):
        fast, xla = (_compiled_with(i, function, x, kernel) for i in ("auto", "xla"))
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(xla), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # The program itself is unchanged: ifjax still sees a depthwise convolution.
    (equation,) = jax.make_jaxpr(conv)(x, kernel).eqns
    assert equation.primitive is lax.conv_general_dilated_p
    assert equation.params["feature_group_count"] == channels


def test_depthwise_taps_is_a_depthwise_convolution():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 3)), jnp.float32)
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    taps = depthwise_taps(x, kernel, (2, 2), ((1, 1), (1, 1)), (1, 1), numbers)
    # Channel by channel, a plain convolution of one channel.
    for c in range(3):
        one = lax.conv_general_dilated(
            x[..., c : c + 1], kernel[..., c : c + 1], (2, 2), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        np.testing.assert_allclose(taps[..., c : c + 1], one, rtol=1e-5, atol=1e-5)
