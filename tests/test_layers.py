"""models.layers: the CPU-fast Conv equals lax.conv_general_dilated, forward and gradients."""

import ctypes
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ifjax
from models import VGG, _native, layers, resnet18
from models.layers import (
    ALL_MATMUL,
    ALL_XLA,
    CONV_VARIABLE,
    FLAGS_VARIABLE,
    XLA_CPU_INFERENCE_OPTIONS,
    XLA_CPU_OPTIONS,
    Conv,
    ConvPaths,
    choose_paths,
    max_pool,
)
from tests.tree_asserts import assert_trees_equal

NHWC = ("NHWC", "HWIO", "NHWC")
TOLERANCE = {"rtol": 2e-5, "atol": 2e-5}
# float32 sums of up to 405 products of N(0, 1) values (magnitudes up to ~60) in another order
NATIVE_TOLERANCE = {"rtol": 2e-5, "atol": 5e-5}
SAME_PAD = ((1, 1), (1, 1))
ALL_NATIVE = ConvPaths("native", "native", "native")
MIXED = (
    ALL_MATMUL,
    ConvPaths("xla", "matmul", "xla"),
    ConvPaths("matmul", "xla", "matmul"),
    ConvPaths("xla", "xla", "matmul"),
    ConvPaths("xla", "xla", "transposed"),
    ConvPaths("xla", "matmul", "transposed"),
    ConvPaths("native", "xla", "transposed"),
    ConvPaths("native", "matmul", "matmul"),
    ConvPaths("native", "native", "native"),
    ConvPaths("native", "matmul", "native"),
    ConvPaths("xla", "native", "xla"),
)
NATIVE_CONV = pytest.mark.skipif(
    not _native.conv2d_available(), reason="the native convolution needs an AVX-512 CPU"
)
# (input N, H, W, I), (kh, kw, O), strides, padding
CASES = [
    ((2, 2, 2, 16), (3, 3, 8), (1, 1), ((1, 1), (1, 1))),
    ((2, 5, 7, 3), (3, 3, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 5, 7, 3), (3, 3, 4), (1, 1), ((0, 0), (0, 0))),
    ((2, 7, 6, 5), (3, 3, 6), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 7, 5), (3, 3, 6), (2, 2), ((0, 0), (0, 0))),
    ((2, 6, 6, 5), (3, 3, 6), (2, 2), ((0, 1), (0, 1))),  # "SAME" at stride 2
    ((2, 7, 5, 4), (1, 1, 6), (2, 2), ((0, 0), (0, 0))),
    ((2, 4, 4, 4), (1, 1, 6), (1, 1), ((0, 0), (0, 0))),
    ((2, 4, 3, 4), (5, 3, 3), (1, 2), ((2, 2), (1, 1))),
    ((1, 1, 1, 8), (3, 3, 4), (1, 1), ((1, 1), (1, 1))),
]


def _arrays(input_shape, kernel_spec, seed=0):
    kh, kw, out = kernel_spec
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=input_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kh, kw, input_shape[-1], out)), jnp.float32)
    return x, kernel


def _reference(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


@pytest.mark.parametrize("paths", MIXED, ids=str)
@pytest.mark.parametrize("input_shape,kernel_spec,strides,padding", CASES)
def test_forward_and_gradients_equal_lax(input_shape, kernel_spec, strides, padding, paths):
    x, kernel = _arrays(input_shape, kernel_spec)
    fast = lambda x, k: layers.conv_general_dilated(x, k, strides, padding, paths)
    reference = lambda x, k: _reference(x, k, strides, padding)
    y = fast(x, kernel)
    np.testing.assert_allclose(y, reference(x, kernel), **TOLERANCE)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    loss = lambda f: jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * cotangent), (0, 1)))
    for got, want in zip(loss(fast)(x, kernel), loss(reference)(x, kernel), strict=True):
        np.testing.assert_allclose(got, want, **TOLERANCE)


@pytest.mark.parametrize(
    "paths",
    [
        ALL_MATMUL,
        ConvPaths("xla", "matmul", "transposed"),
        ConvPaths("native", "xla", "transposed"),
        ConvPaths("native", "native", "native"),
    ],
    ids=str,
)
def test_forward_mode_and_vmap_equal_lax(paths):
    x, kernel = _arrays((2, 2, 3, 4), (3, 3, 5))
    padding = ((1, 1), (1, 1))
    fast = lambda x, k: layers.conv_general_dilated(x, k, (1, 1), padding, paths)
    reference = lambda x, k: _reference(x, k, (1, 1), padding)
    tangents = (jnp.ones_like(x), 0.5 * kernel)
    got = jax.jvp(fast, (x, kernel), tangents)
    want = jax.jvp(reference, (x, kernel), tangents)
    assert_trees_equal(got, want, **TOLERANCE)
    stacked = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(
        jax.vmap(fast, (0, None))(stacked, kernel),
        jax.vmap(reference, (0, None))(stacked, kernel),
        **TOLERANCE,
    )
    # per-replica kernels and inputs, gradients included (split-data training vmaps this)
    kernels = jnp.stack([kernel, -kernel])
    grad = lambda f: jax.vmap(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), (0, 1)))
    assert_trees_equal(grad(fast)(stacked, kernels), grad(reference)(stacked, kernels), **TOLERANCE)


def test_native_kernel_is_built_and_used():
    assert _native.native_available()  # CI machines have a C++ compiler
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 5)), jnp.float32)
    text = jax.jit(_native.batch_to_minor).lower(x).as_text()
    assert "ifjax_batch_to_minor" in text
    choose = choose_paths((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)))
    native = _native.conv2d_available()
    assert choose == (ALL_NATIVE if native else ConvPaths("xla", "xla", "transposed"))


# (input N, H, W, I), (kh, kw, O), strides, padding: every remainder of the 64-channel
# blocks (O = 1, 17, 45, 64, 65, 130, 200), pixel counts that leave every remainder of the
# 6-, 8- and 12-pixel blocks, single images (split by channel block), asymmetric padding.
NATIVE_CASES = [
    ((3, 5, 7, 45), (3, 3, 37), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 6, 20), (5, 3, 70), (2, 2), ((2, 2), (1, 1))),
    ((1, 4, 4, 8), (3, 3, 200), (1, 1), ((1, 1), (1, 1))),
    ((5, 3, 11, 1), (3, 3, 1), (1, 1), ((0, 2), (1, 0))),
    ((2, 8, 8, 16), (3, 3, 64), (2, 1), ((1, 1), (1, 1))),
    ((4, 6, 5, 32), (3, 3, 65), (1, 1), ((0, 0), (0, 0))),
    ((2, 2, 2, 64), (3, 3, 130), (1, 1), ((1, 1), (1, 1))),
    ((3, 7, 7, 24), (2, 2, 17), (3, 3), ((0, 1), (0, 1))),
    ((2, 10, 10, 3), (1, 1, 48), (1, 1), ((0, 0), (0, 0))),
    # padding beyond the kernel (the input gradient crops), a 1x1 kernel at stride 2 (a
    # phase without taps), stride 3 with a 3x3 kernel and odd sizes
    ((2, 9, 9, 5), (2, 2, 6), (1, 1), ((3, 0), (2, 2))),
    ((2, 7, 5, 4), (1, 1, 6), (2, 2), ((0, 0), (0, 0))),
    ((2, 10, 8, 6), (3, 3, 10), (3, 2), ((1, 2), (0, 1))),
]


@NATIVE_CONV
@pytest.mark.parametrize("input_shape,kernel_spec,strides,padding", NATIVE_CASES)
def test_native_conv2d_equals_lax(input_shape, kernel_spec, strides, padding):
    x, kernel = _arrays(input_shape, kernel_spec, seed=3)
    got = jax.jit(lambda x, k: _native.conv2d(x, k, strides, padding))(x, kernel)
    want = _reference(x, kernel, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **NATIVE_TOLERANCE)
    # vmapped (one call per element), per-element kernels
    stacked, kernels = jnp.stack([x, -2 * x]), jnp.stack([kernel, 0.5 * kernel])
    batched = jax.vmap(lambda x, k: _native.conv2d(x, k, strides, padding))(stacked, kernels)
    expected = jax.vmap(lambda x, k: _reference(x, k, strides, padding))(stacked, kernels)
    np.testing.assert_allclose(batched, expected, **NATIVE_TOLERANCE)


@NATIVE_CONV
def test_native_conv2d_is_deterministic_and_keeps_padding_zero_between_geometries():
    # Two geometries with the same padded image size in a row: the second must not see the
    # first one's data in its padding (the scratch buffer is per thread and geometry).
    a, ka = _arrays((8, 6, 4, 8), (3, 3, 16), seed=5)
    b, kb = _arrays((8, 4, 6, 8), (3, 3, 16), seed=6)
    same = ((1, 1), (1, 1))
    conv = jax.jit(lambda x, k: _native.conv2d(x, k, (1, 1), same))
    first = np.asarray(conv(a, ka))
    np.testing.assert_allclose(conv(b, kb), _reference(b, kb, (1, 1), same), **NATIVE_TOLERANCE)
    np.testing.assert_array_equal(conv(a, ka), first)


def _custom_calls(text: str) -> list[str]:
    return sorted(re.findall(r"custom_call @(ifjax_\w+)", text))


def _padded_reference(x, kernel, strides, padding):
    """``_reference`` with the padding applied by ``jnp.pad``: XLA:CPU (jaxlib 0.10.2)
    computes the input gradient of ``_reference`` wrongly for some paddings larger than
    the kernel (garbage values for ((3, 0), (2, 2)) with a 2x2 kernel)."""
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    return _reference(x, kernel, strides, ((0, 0), (0, 0)))


@NATIVE_CONV
@pytest.mark.parametrize("input_shape,kernel_spec,strides,padding", NATIVE_CASES)
def test_native_conv2d_gradients_equal_lax(input_shape, kernel_spec, strides, padding):
    x, kernel = _arrays(input_shape, kernel_spec, seed=4)
    native = lambda x, k: _native.conv2d(x, k, strides, padding)
    reference = lambda x, k: _padded_reference(x, k, strides, padding)
    y = reference(x, kernel)
    dy = jnp.asarray(np.random.default_rng(5).normal(size=y.shape), jnp.float32)
    vjp = lambda f: jax.jit(lambda x, k, dy: jax.vjp(f, x, k)[1](dy))
    got, want = vjp(native)(x, kernel, dy), vjp(reference)(x, kernel, dy)
    assert_trees_equal(got, want, **NATIVE_TOLERANCE)
    # the gradients as functions of their own
    input_grad = _native.conv2d_input_grad(dy, kernel, strides, padding, input_shape[1:3])
    np.testing.assert_allclose(input_grad, want[0], **NATIVE_TOLERANCE)
    kernel_grad = _native.conv2d_kernel_grad(x, dy, strides, padding, kernel_spec[:2])
    np.testing.assert_allclose(kernel_grad, want[1], **NATIVE_TOLERANCE)
    # both gradients are custom calls, no XLA convolution: the input gradient is one
    # stride-1 convolution per phase (s_h x s_w of them, fewer where a phase has no taps)
    text = vjp(native).lower(x, kernel, dy).as_text()
    phases = sum(
        1
        for a in range(strides[0])
        for b in range(strides[1])
        if a < kernel_spec[0] and b < kernel_spec[1]
    )
    calls = ["ifjax_conv2d"] * phases + ["ifjax_conv2d_kernel_grad"]
    assert _custom_calls(text) == calls
    assert "convolution" not in text
    # forward mode, and second order (the gradient's own gradient)
    tangents = (0.5 * x, -kernel)
    assert_trees_equal(
        jax.jvp(native, (x, kernel), tangents),
        jax.jvp(reference, (x, kernel), tangents),
        **NATIVE_TOLERANCE,
    )

    def second(f):
        inner = lambda k: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, k) ** 2))(x) ** 2)
        return jax.jit(jax.grad(inner))(kernel)

    want = second(reference)  # sums of large terms that cancel: tolerance relative to the scale
    np.testing.assert_allclose(second(native), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@NATIVE_CONV
def test_native_conv2d_under_vmap_folds_shared_kernels_and_maps_per_replica_ones():
    x, kernel = _arrays((3, 6, 5, 12), (3, 3, 20), seed=7)
    stacked, kernels = jnp.stack([x, -2 * x]), jnp.stack([kernel, 0.5 * kernel])
    native = lambda x, k: _native.conv2d(x, k, (1, 1), SAME_PAD)
    reference = lambda x, k: _reference(x, k, (1, 1), SAME_PAD)
    for axes, args in (((0, None), (stacked, kernel)), ((None, 0), (x, kernels))):
        got = jax.vmap(native, axes)(*args)
        np.testing.assert_allclose(got, jax.vmap(reference, axes)(*args), **NATIVE_TOLERANCE)
    # a shared kernel: one call over all 2 x 3 images (no loop)
    text = jax.jit(jax.vmap(native, (0, None))).lower(stacked, kernel).as_text()
    assert "while" not in text and _custom_calls(text) == ["ifjax_conv2d"]
    # per-replica gradients (split-data training vmaps this)
    loss = lambda f: jax.vmap(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), (0, 1)))
    assert_trees_equal(
        loss(native)(stacked, kernels), loss(reference)(stacked, kernels), **NATIVE_TOLERANCE
    )
    # per-example kernel gradients with a shared input
    per_example = lambda f: jax.vmap(jax.grad(lambda k, dy: jnp.sum(f(x, k) * dy)), (None, 0))
    dys = jnp.stack([jnp.ones((3, 6, 5, 20)), -jnp.ones((3, 6, 5, 20))])
    np.testing.assert_allclose(
        per_example(native)(kernel, dys),
        per_example(reference)(kernel, dys),
        **NATIVE_TOLERANCE,
    )


@NATIVE_CONV
def test_native_kernel_gradient_is_deterministic():
    # 64 output channels and 40 images: several image ranges summed in a fixed order
    x, _ = _arrays((40, 8, 8, 16), (3, 3, 64), seed=8)
    dy = jnp.asarray(np.random.default_rng(9).normal(size=(40, 8, 8, 64)), jnp.float32)
    grad = jax.jit(lambda x, dy: _native.conv2d_kernel_grad(x, dy, (1, 1), SAME_PAD, (3, 3)))
    first = np.asarray(grad(x, dy))
    for _ in range(3):
        np.testing.assert_array_equal(grad(x, dy), first)
    want = jax.linear_transpose(
        lambda k: _reference(x, k, (1, 1), SAME_PAD), jnp.zeros((3, 3, 16, 64))
    )(dy)[0]
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-3)


@NATIVE_CONV
@pytest.mark.parametrize(
    "input_shape,kernel_spec,strides,padding",
    [
        ((2, 5, 5, 4), (3, 3, 6), (1, 1), SAME_PAD),
        ((2, 7, 6, 3), (3, 3, 5), (2, 2), ((1, 1), (0, 1))),
        # XLA's own input gradient of this padding is wrong (see _padded_reference)
        ((2, 9, 9, 5), (2, 2, 6), (1, 1), ((3, 0), (2, 2))),
    ],
)
def test_native_primitives_lower_to_xla_where_the_kernel_is_unavailable(
    monkeypatch, input_shape, kernel_spec, strides, padding
):
    # e.g. a function traced here and lowered for another backend, or after
    # IFJAX_NATIVE_CONV=0: the primitives' reference lowering is XLA's convolution
    x, kernel = _arrays(input_shape, kernel_spec, seed=10)
    dy = jnp.ones(_reference(x, kernel, strides, padding).shape)

    def fn(x, k, dy):  # a function of its own: nothing traced or lowered before
        y, vjp = jax.vjp(lambda x, k: _native.conv2d(x, k, strides, padding), x, k)
        return (y, *vjp(dy))

    reference = lambda x, k: _padded_reference(x, k, strides, padding)
    y, vjp = jax.vjp(reference, x, kernel)
    traced = jax.jit(fn).trace(x, kernel, dy)
    monkeypatch.setenv(_native.NATIVE_CONV_VARIABLE, "0")
    lowered = traced.lower()
    assert _custom_calls(lowered.as_text()) == [] and "convolution" in lowered.as_text()
    assert_trees_equal(lowered.compile()(x, kernel, dy), (y, *vjp(dy)), **NATIVE_TOLERANCE)


@NATIVE_CONV
def test_native_conv_runs_in_models_and_not_for_other_dtypes():
    model = resnet18(num_classes=10, widths=(8, 16, 16, 32))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    apply = lambda v, x: model.apply(v, x, train=False)
    assert "ifjax_conv2d" in jax.jit(apply).lower(variables, x).as_text()
    kernel = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
    with pytest.raises(TypeError, match="float32 only"):
        _native.conv2d(x.astype(jnp.bfloat16), kernel, (1, 1), SAME_PAD)
    # bfloat16 through the layer: XLA's convolution, no custom call
    paths = ConvPaths("native", "xla", "xla")
    fn = jax.jit(lambda x, k: layers.conv_general_dilated(x, k, (1, 1), SAME_PAD, paths))
    text = fn.lower(x.astype(jnp.bfloat16), kernel).as_text()
    assert "ifjax_conv2d" not in text


def test_native_conv_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(_native.NATIVE_CONV_VARIABLE, "0")
    assert not _native.conv2d_available()
    paths = choose_paths((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), SAME_PAD)
    assert paths.forward == "xla"
    x, kernel = _arrays((2, 5, 5, 4), (3, 3, 6))
    fn = jax.jit(lambda x, k: layers.conv_general_dilated(x, k, (1, 1), SAME_PAD))
    assert "ifjax_conv2d" not in fn.lower(x, kernel).as_text()
    with pytest.raises(RuntimeError, match="not available"):
        _native.conv2d(x, kernel, (1, 1), SAME_PAD)


@NATIVE_CONV
def test_native_conv_gradients_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(_native.NATIVE_CONV_VARIABLE, "forward")
    assert _native.conv2d_available() and not _native.native_conv_gradients()
    paths = choose_paths((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), SAME_PAD)
    assert paths == ConvPaths("native", "xla", "transposed")
    x, kernel = _arrays((2, 5, 5, 4), (3, 3, 6))

    def custom_calls(paths):  # paths given: conv_general_dilated is traced afresh
        loss = lambda x, k: jnp.sum(layers.conv_general_dilated(x, k, (1, 1), SAME_PAD, paths) ** 2)
        return _custom_calls(jax.jit(jax.grad(loss, (0, 1))).lower(x, kernel).as_text())

    paths = choose_paths(x.shape, kernel.shape, (1, 1), SAME_PAD)
    assert paths == ConvPaths("native", "xla", "transposed")
    assert custom_calls(paths) == ["ifjax_batch_to_minor", "ifjax_conv2d"]
    monkeypatch.delenv(_native.NATIVE_CONV_VARIABLE)
    paths = choose_paths(x.shape, kernel.shape, (1, 1), SAME_PAD)
    assert paths == ALL_NATIVE
    assert custom_calls(paths) == ["ifjax_conv2d", "ifjax_conv2d", "ifjax_conv2d_kernel_grad"]


@pytest.mark.parametrize(
    "shape,dtype",
    [((2, 3, 4, 5), jnp.float32), ((17, 1, 1, 33), jnp.float32), ((3, 5, 2, 4), jnp.bfloat16)]
    + [((4, 2, 3, 2), jnp.int32), ((2, 2, 2, 3), jnp.float64)],
)
def test_batch_to_minor_is_a_transpose(shape, dtype):
    x = np.arange(np.prod(shape)).reshape(shape)
    x = jnp.asarray(x, dtype) if dtype != jnp.float64 else np.asarray(x, np.float64)
    want = np.transpose(np.asarray(x), (3, 1, 2, 0))
    np.testing.assert_array_equal(jax.jit(_native.batch_to_minor)(x), want)
    stacked = jnp.stack([jnp.asarray(x), -jnp.asarray(x)])
    np.testing.assert_array_equal(
        jax.vmap(_native.batch_to_minor)(stacked), np.stack([want, -want])
    )


def test_native_kernel_builds_from_scratch_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("IFJAX_CACHE_DIR", str(tmp_path))
    library = _native._build()
    assert library.parent == tmp_path / "kernels" and library.suffix == ".so"
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # no leftovers
    assert hasattr(ctypes.cdll.LoadLibrary(str(library)), _native._SYMBOL)
    assert _native._build() == library  # cached: same file, not rebuilt
    assert library.stat().st_mtime_ns == _native._build().stat().st_mtime_ns


def test_native_kernel_builds_in_the_temporary_directory_if_the_cache_is_unwritable(
    monkeypatch, tmp_path
):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("IFJAX_CACHE_DIR", str(blocked))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    library = _native._build()
    assert library.parent == tmp_path / "tmp" / f"ifjax-kernels-{os.getuid()}"
    assert hasattr(ctypes.cdll.LoadLibrary(str(library)), _native._SYMBOL)


def test_native_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_registered", [])
    monkeypatch.setattr(_native, "_fallbacks", {})  # the process's first fallback warns
    monkeypatch.setenv("IFJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    _native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU kernel unavailable"):
            assert not _native.native_available()
        assert not _native.native_available()  # once per process: no second warning
        x = jnp.ones((2, 3, 4, 5))
        fresh = jax.jit(lambda v: _native.batch_to_minor(v))  # not an earlier cached trace
        assert "ifjax_batch_to_minor" not in fresh.lower(x).as_text()
        np.testing.assert_array_equal(fresh(x), np.transpose(np.asarray(x), (3, 1, 2, 0)))
        paths = choose_paths((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)))
        assert paths == ALL_XLA
    finally:
        _native._load.cache_clear()


def test_native_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(_native.NATIVE_VARIABLE, "0")
    _native._load.cache_clear()
    try:
        assert not _native.native_available()
    finally:
        _native._load.cache_clear()


def test_choose_paths_follows_the_measured_rules():
    same = ((1, 1), (1, 1))
    for native, kernel_grad in ((False, "xla"), (True, "transposed")):
        choose = functools.partial(choose_paths, native=native, native_conv=False)
        assert choose((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), same) == ALL_MATMUL
        one_by_one = choose((128, 8, 8, 256), (1, 1, 256, 512), (2, 2), ((0, 0), (0, 0)))
        assert one_by_one == ALL_MATMUL
        plain = ConvPaths("xla", "xla", kernel_grad)
        assert choose((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), same) == plain
        assert choose((128, 32, 32, 3), (3, 3, 3, 64), (1, 1), same) == plain
        assert choose((128, 8, 8, 256), (3, 3, 256, 256), (1, 1), same) == plain
        matmul_input_grad = ConvPaths("xla", "matmul", kernel_grad)
        assert choose((128, 32, 32, 64), (3, 3, 64, 128), (2, 2), same) == matmul_input_grad
        assert choose((128, 4, 4, 512), (3, 3, 512, 512), (1, 1), same) == matmul_input_grad
        # the native convolution for the forward pass only (IFJAX_NATIVE_CONV=forward)
        native_conv = functools.partial(
            choose_paths, native=native, native_conv=True, native_grads=False
        )
        small = native_conv((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), same)
        assert small == ConvPaths("native", "matmul", "matmul")
        one_by_one = native_conv((128, 8, 8, 256), (1, 1, 256, 512), (2, 2), ((0, 0), (0, 0)))
        assert one_by_one == ALL_MATMUL
        plain = native_conv((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), same)
        assert plain == ConvPaths("native", "xla", kernel_grad)
        strided = native_conv((128, 32, 32, 64), (3, 3, 64, 128), (2, 2), same)
        assert strided == ConvPaths("native", "matmul", kernel_grad)
        # native gradients too: every kernel but 1x1; the input gradient of output maps
        # smaller than the kernel by the matmul path
        native_all = functools.partial(
            choose_paths, native=native, native_conv=True, native_grads=True
        )
        assert native_all((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), same) == ALL_NATIVE
        assert native_all((128, 32, 32, 3), (3, 3, 3, 64), (1, 1), same) == ALL_NATIVE
        assert native_all((128, 4, 4, 512), (3, 3, 512, 512), (1, 1), same) == ALL_NATIVE
        strided = native_all((128, 32, 32, 64), (3, 3, 64, 128), (2, 2), same)
        assert strided == ALL_NATIVE
        wide = native_all((128, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((3, 3), (1, 1)))
        assert wide == ALL_NATIVE
        small = native_all((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), same)
        assert small == ConvPaths("native", "matmul", "native")
        one_by_one = native_all((128, 8, 8, 256), (1, 1, 256, 512), (2, 2), ((0, 0), (0, 0)))
        assert one_by_one == ALL_MATMUL


def _python(code: str, **env: str) -> str:
    """stdout of ``code`` in a fresh interpreter (JAX's flags are read once per process)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    environment.pop(FLAGS_VARIABLE, None)
    environment.pop(CONV_VARIABLE, None)
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout.strip()


_SHOW_FLAGS = """
import os, re
import models, jax, jax.numpy as jnp
from jax import lax
nhwc = ("NHWC", "HWIO", "NHWC")
conv = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=nhwc))
text = conv.lower(jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
print(repr(os.environ.get("XLA_FLAGS")), "__ynn_fusion" in text, models.configure_xla_cpu())
"""


def test_importing_models_sets_the_xla_cpu_flags_before_the_backend_starts():
    flags, ynn_convolution, again = _python(_SHOW_FLAGS).split(" ", 2)
    expected = [f"--{name}={value}" for name, value in XLA_CPU_OPTIONS.items()]
    assert eval(flags) == " ".join(expected)
    assert ynn_convolution == "False"  # the convolution stays with XLA
    assert again == "[]"  # the backend has started: nothing more is changed


@pytest.mark.parametrize(
    "env",
    [
        {FLAGS_VARIABLE: "0"},
        {CONV_VARIABLE: "xla"},
        {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"},
    ],
    ids=["opt-out", "plain-xla", "user-flags"],
)
def test_xla_cpu_flags_are_left_alone_when_asked_or_already_set(env):
    flags, ynn_convolution, _ = _python(_SHOW_FLAGS, **env).split(" ", 2)
    assert eval(flags) == env.get("XLA_FLAGS")
    if "XLA_FLAGS" not in env:
        assert ynn_convolution == "True"  # jaxlib's default: YNNPACK convolutions


def test_unknown_flags_are_never_set(monkeypatch):
    assert layers._jaxlib_knows(list(XLA_CPU_OPTIONS))
    assert not layers._jaxlib_knows(["xla_cpu_no_such_flag_anywhere"])
    monkeypatch.setattr(layers, "XLA_CPU_OPTIONS", {"xla_cpu_no_such_flag_anywhere": "1"})
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert layers.configure_xla_cpu() == []
    assert "XLA_FLAGS" not in os.environ


def _product_sums(a, b):
    return jnp.sum(jnp.tanh(a @ b), axis=0)


def _ifjax_flags() -> str:
    return " ".join(f"--{name}={value}" for name, value in XLA_CPU_OPTIONS.items())


def test_inference_jit_compiles_with_the_inference_options_on_cpu(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {_ifjax_flags()}")
    assert layers.inference_compiler_options() == XLA_CPU_INFERENCE_OPTIONS
    f = layers.inference_jit(_product_sums)
    assert f.__wrapped__ is _product_sums
    a = jnp.arange(48.0).reshape(8, 6) / 50
    b = jnp.arange(24.0).reshape(6, 4) / 30
    tuned = f._jit_for((a, b), {})
    assert tuned is not f._plain
    np.testing.assert_allclose(f(a, b), _product_sums(np.asarray(a), np.asarray(b)), rtol=1e-6)
    # The options reach the executable: no YNNPACK fusion, unlike the training options.
    training_jit = jax.jit(_product_sums, compiler_options=XLA_CPU_OPTIONS)
    if "__ynn_fusion" in training_jit.lower(a, b).compile().as_text():
        assert "__ynn_fusion" not in f.lower(a, b).compile().as_text()
    compiled = f._cache_size()
    f(a + 1, b - 1)
    assert f._cache_size() == compiled  # same shapes: no new compilation
    committed = jax.device_put((a, b), jax.devices("cpu")[0])
    assert f._jit_for(committed, {}) is tuned
    # Under an outer trace the outer function's compile options apply.
    chosen = []

    def outer(a, b):
        chosen.append(f._jit_for((a, b), {}))
        return f(a, b) * 2

    np.testing.assert_allclose(jax.jit(outer)(a, b), 2 * f(a, b), rtol=1e-6)
    assert chosen == [f._plain]
    f.clear_cache()
    assert f._cache_size() == 0


@pytest.mark.parametrize(
    "flags",
    ["", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"],
    ids=["opted-out", "user-flags"],
)
def test_inference_jit_is_plain_jit_without_ifjax_flags(monkeypatch, flags):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert layers.inference_compiler_options() is None
    f = layers.inference_jit(_product_sums)
    a = jnp.ones((3, 3))
    assert f._jit_for((a, a), {}) is f._plain
    np.testing.assert_allclose(f(a, a), _product_sums(a, a))
    assert f._cache_size() == 1


def test_evaluation_steps_are_inference_jits():
    from train import split, training

    assert isinstance(training.eval_step, layers.InferenceJit)
    model = VGG(cfg=(4, "M"), num_classes=3)
    assert isinstance(split._replica_eval_step(model, None), layers.InferenceJit)


@pytest.mark.parametrize("implementation", ["auto", "matmul"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(
    "features,kernel_size,strides,padding",
    [(8, (3, 3), 1, 1), (8, (3, 3), 2, 1), (6, (1, 1), 2, 0), (5, (3, 3), 2, "SAME")],
)
def test_conv_module_equals_nn_conv(
    monkeypatch, implementation, use_bias, features, kernel_size, strides, padding
):
    monkeypatch.setenv("IFJAX_CONV", implementation)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), jnp.float32)
    options = dict(strides=strides, padding=padding, use_bias=use_bias)
    fast, plain = Conv(features, kernel_size, **options), nn.Conv(features, kernel_size, **options)
    variables = fast.init(jax.random.key(0), x)
    assert_trees_equal(variables, plain.init(jax.random.key(0), x))

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    for f in (lambda m: m.apply, lambda m: jax.grad(loss(m), (0, 1))):
        assert_trees_equal(jax.jit(f(fast))(variables, x), f(plain)(variables, x), **TOLERANCE)


@pytest.mark.parametrize(
    "implementation,expected",
    [("xla", "conv_general_dilated_primitive"), ("matmul", "named"), ("auto", "named")],
)
def test_implementation_variable_selects_the_path(monkeypatch, implementation, expected):
    monkeypatch.setenv("IFJAX_CONV", implementation)
    x = jnp.zeros((2, 2, 2, 4))
    module = Conv(4, (3, 3), padding=1, use_bias=False)
    variables = module.init(jax.random.key(0), x)
    eqns = jax.make_jaxpr(module.apply)(variables, x).jaxpr.eqns
    (eqn,) = eqns
    if expected == "named":
        assert eqn.primitive.name in ("jit", "pjit")
        assert eqn.params["name"] == "conv_general_dilated"
    else:
        assert eqn.primitive.name == "conv_general_dilated"


def test_unknown_implementation_is_an_error(monkeypatch):
    monkeypatch.setenv("IFJAX_CONV", "fast")
    with pytest.raises(ValueError, match="IFJAX_CONV"):
        Conv(4, (3, 3)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))


@pytest.mark.parametrize(
    "options",
    [dict(kernel_dilation=2), dict(input_dilation=2, padding=1), dict(feature_group_count=2)],
    ids=["kernel_dilation", "input_dilation", "groups"],
)
def test_unsupported_convolutions_fall_back_to_lax(monkeypatch, options):
    monkeypatch.setenv("IFJAX_CONV", "matmul")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 4)), jnp.float32)
    fast, plain = Conv(4, (3, 3), **options), nn.Conv(4, (3, 3), **options)
    variables = fast.init(jax.random.key(0), x)
    (eqn,) = [e for e in jax.make_jaxpr(fast.apply)(variables, x).jaxpr.eqns if "conv" in str(e)]
    assert eqn.primitive.name == "conv_general_dilated"
    np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), **TOLERANCE)


@pytest.mark.parametrize(
    "model,size",
    [(VGG(cfg=(8, "M", 16, "M", 16, "M", 16)), 16), (resnet18(widths=(4, 8, 8, 8)), 32)],
    ids=["vgg", "resnet18"],
)
def test_groups_are_the_same_whichever_path(monkeypatch, model, size):
    x = jnp.zeros((1, size, size, 3))
    variables = model.init(jax.random.key(0), x)
    found = {}
    for implementation in ("xla", "matmul"):
        monkeypatch.setenv("IFJAX_CONV", implementation)
        found[implementation] = ifjax.discover_groups(model, variables, x)
    assert found["matmul"] == found["xla"]
    assert len(found["xla"]) > 1


def test_repeated_calls_do_not_recompile(monkeypatch):
    monkeypatch.setenv("IFJAX_CONV", "auto")
    model = VGG(cfg=(8, "M", 16, "M", 16, "M", 16))
    x = jnp.zeros((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    apply = jax.jit(model.apply)
    for _ in range(3):
        apply(variables, x + 1.0)
    assert apply._cache_size() == 1


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 5, 4), (1, 2, 2, 2)])
def test_max_pool_equals_nn_max_pool_with_ties(monkeypatch, shape):
    monkeypatch.setenv("IFJAX_CONV", "auto")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 3, shape), jnp.float32)  # many ties in every window
    fast = lambda x: max_pool(x, (2, 2), strides=(2, 2))
    plain = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(jax.jit(fast)(x), plain(x))
    cotangent = jnp.asarray(rng.normal(size=plain(x).shape), jnp.float32)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cotangent))(x)
    np.testing.assert_array_equal(jax.jit(lambda x: grad(fast))(x), grad(plain))
    tangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
    assert_trees_equal(jax.jvp(fast, (x,), (tangent,)), jax.jvp(plain, (x,), (tangent,)))


@pytest.mark.parametrize(
    "options",
    [dict(strides=(1, 1)), dict(strides=(2, 2), padding="SAME"), dict(strides=None)],
    ids=["overlapping", "padded", "no_strides"],
)
def test_max_pool_falls_back_to_nn_max_pool(monkeypatch, options):
    monkeypatch.setenv("IFJAX_CONV", "auto")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: max_pool(x, (2, 2), **options))(x)
    assert "custom_jvp_call" not in str(jaxpr)
    np.testing.assert_array_equal(max_pool(x, (2, 2), **options), nn.max_pool(x, (2, 2), **options))


def test_max_pool_keeps_groups_discoverable(monkeypatch):
    monkeypatch.setenv("IFJAX_CONV", "auto")

    class Net(nn.Module):
        pool: object

        @nn.compact
        def __call__(self, x):
            x = self.pool(nn.relu(Conv(4, (3, 3), name="conv0")(x)), (2, 2), strides=(2, 2))
            x = self.pool(Conv(6, (3, 3), name="conv1")(x), (2, 2), strides=(2, 2))
            return nn.Dense(2, name="head")(x.reshape((x.shape[0], -1)))

    x = jnp.zeros((1, 8, 8, 3))
    variables = Net(nn.max_pool).init(jax.random.key(0), x)
    groups = [ifjax.discover_groups(Net(p), variables, x) for p in (max_pool, nn.max_pool)]
    assert groups[0] == groups[1]
    assert [g.size for g in groups[0]] == [6, 4]


def test_native_conv_stub_builds_without_avx512(tmp_path):
    # What other architectures compile: the library (and so the transpose kernel) still
    # builds, and the convolution reports itself unsupported.
    compiler = _native._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    library = tmp_path / "stub.so"
    command = [compiler, *_native._FLAGS, "-DIFJAX_NO_AVX512", "-I", jax.ffi.include_dir()]
    command += [*map(str, _native._SOURCES), "-o", str(library)]
    subprocess.run(command, check=True, capture_output=True)
    loaded = ctypes.cdll.LoadLibrary(str(library))
    assert loaded.IfjaxConvSupported() == 0
    symbols = (_native._SYMBOL, _native._CONV_SYMBOL, _native._KERNEL_GRAD_SYMBOL)
    assert all(hasattr(loaded, symbol) for symbol in symbols)


def test_cpus_without_avx512_use_xla_convolutions(monkeypatch):
    assert _native.native_available()
    monkeypatch.setattr(_native, "_conv_supported", [False])
    assert not _native.conv2d_available()
    paths = choose_paths((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), SAME_PAD)
    assert paths == ConvPaths("xla", "xla", "transposed")
