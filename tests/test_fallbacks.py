"""Native kernels that never break a run: whatever part of models.layers/models._native a
JAX release, a missing compiler or a failing registration breaks, ifjax computes plain XLA
(equal results) with exactly one warning (models._native.fall_back)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from jax import lax
from jax._src import xla_bridge
from jax._src.lax import convolution

from models import _native, layers
from models.layers import CONV_VARIABLE, Conv, depthwise_taps
from tests.tree_asserts import assert_trees_equal

# (jax.interpreters.mlir is reached through models._native: the subprocess test below
# imports this module without it)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
NHWC = ("NHWC", "HWIO", "NHWC")


class Net(nn.Module):
    """Two 3x3 convolutions (stride 1, then 2): the native path where it is available."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv(16, (3, 3), padding=1, name="conv0")(x))
        return Conv(24, (3, 3), strides=2, padding=1, name="conv1")(x)


@pytest.fixture(scope="module")
def net():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 16)), jnp.float32)
    return Net().init(jax.random.key(0), x), x


@pytest.fixture
def fresh(monkeypatch):
    """A process where nothing fell back yet and the kernel is loaded anew; restored after."""
    monkeypatch.setattr(_native, "_fallbacks", {})
    _native._load.cache_clear()
    yield
    _native._load.cache_clear()


@contextlib.contextmanager
def one_warning(what: str):
    """Asserts that the block issues exactly one warning: ifjax's fallback of ``what``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert len(caught) == 1, messages
    assert caught[0].category is RuntimeWarning
    assert str(caught[0].message).startswith(f"ifjax: {what} unavailable"), messages


def outputs(monkeypatch, net, implementation="auto"):
    """Forward pass, loss and gradients of ``net``, jitted afresh with ``IFJAX_CONV``, and
    the program's text."""
    variables, x = net
    monkeypatch.setenv(CONV_VARIABLE, implementation)

    def loss(variables, x):
        y = Net().apply(variables, x)
        return jnp.sum(jnp.sin(y)), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    text = step.lower(variables, x).as_text()
    return step(variables, x), text


def assert_plain_xla(monkeypatch, net, text, result):
    """No native custom call in the program, and results equal to ``IFJAX_CONV=xla``'s."""
    assert "ifjax_conv2d" not in text and "ifjax_batch_to_minor" not in text
    expected, xla_text = outputs(monkeypatch, net, "xla")
    assert "ifjax_" not in xla_text
    assert_trees_equal(result, expected, **TOLERANCE)
    assert np.abs(np.asarray(result[0][1])).max() > 0.1  # real values, not zeros


# --------------------------------------------------------------- the native kernel library


def _failing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("IFJAX_CACHE_DIR", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails


def _failing_load(monkeypatch, tmp_path):
    def load(path):
        raise OSError(f"{path}: cannot open shared object file (simulated)")

    monkeypatch.setattr(ctypes.cdll, "LoadLibrary", load)


def _failing_registration(monkeypatch, tmp_path):
    def register(*args, **kwargs):
        raise RuntimeError("simulated: this jaxlib rejects the FFI target")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", register)


@pytest.mark.parametrize(
    "breaker",
    [_failing_compiler, _failing_load, _failing_registration],
    ids=["build", "import", "registration"],
)
def test_native_kernel_failures_fall_back_to_xla(monkeypatch, tmp_path, fresh, net, breaker):
    monkeypatch.setattr(_native, "_registered", [])  # as in a process that loads it anew
    monkeypatch.setattr(_native, "_conv_supported", [])
    breaker(monkeypatch, tmp_path)
    with one_warning("native CPU kernel"):
        result, text = outputs(monkeypatch, net)
        assert not _native.native_available() and not _native.conv2d_available()
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 5)), jnp.float32)
        np.testing.assert_array_equal(
            jax.jit(lambda v: _native.batch_to_minor(v))(x), np.transpose(x, (3, 1, 2, 0))
        )
    assert list(_native.fallbacks()) == [_native.NATIVE_KERNEL]
    assert layers.choose_paths((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1),) * 2) == (
        layers.ALL_XLA
    )
    assert_plain_xla(monkeypatch, net, text, result)


# ------------------------------------------------------------ the convolution primitives


def test_native_primitives_that_this_jax_cannot_register_leave_xla(monkeypatch, fresh, net):
    assert _native.native_available()  # CI machines have a C++ compiler
    monkeypatch.setattr(_native, "_conv_supported", [True])  # even without AVX-512

    def register(*args, **kwargs):
        raise TypeError("register_lowering() got an unexpected keyword argument (simulated)")

    monkeypatch.setattr(_native.mlir, "register_lowering", register)
    with pytest.raises(TypeError, match="simulated"):
        _native._define_primitives()
    # What import found: the module still imports, without primitives.
    monkeypatch.setattr(_native, "_PRIMITIVES", None)
    monkeypatch.setattr(_native, "_PRIMITIVES_ERROR", TypeError("register_lowering (simulated)"))
    with one_warning("native convolution"):
        result, text = outputs(monkeypatch, net)
        assert not _native.conv2d_available()
    assert "ifjax_batch_to_minor" in text  # the transpose kernel is still used ...
    text = text.replace("ifjax_batch_to_minor", "")
    assert_plain_xla(monkeypatch, net, text, result)  # ... the convolutions are XLA's


def test_native_primitives_without_jax_interpreters_leave_xla(monkeypatch):
    error = ImportError("cannot import name 'mlir' from 'jax.interpreters' (simulated)")
    monkeypatch.setattr(_native, "_INTERPRETERS_ERROR", error)
    with pytest.raises(ImportError, match="simulated"):
        _native._define_primitives()


def test_native_lowering_that_fails_falls_back_to_xla(monkeypatch, fresh, net):
    assert _native.native_available()
    monkeypatch.setattr(_native, "_conv_supported", [True])

    def lowering(*args, **kwargs):
        raise AttributeError("module 'jax.ffi' has no attribute 'ffi_lowering' (simulated)")

    monkeypatch.setattr(jax.ffi, "ffi_lowering", lowering)
    x, kernel = net[1], net[0]["params"]["conv0"]["kernel"]
    strides, padding = (1, 1), ((1, 1), (1, 1))

    def loss(x, kernel):  # traced with the native primitives, lowered to XLA's
        return jnp.sum(jnp.sin(_native.conv2d(x, kernel, strides, padding)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with one_warning("native convolution"):
        assert "ifjax_conv2d" not in step.lower(x, kernel).as_text()
        result = step(x, kernel)

    def reference(x, kernel):
        y = lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y))

    expected = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(x, kernel)
    assert_trees_equal(result, expected, **TOLERANCE)
    assert list(_native.fallbacks()) == [_native.NATIVE_CONV]
    assert not _native.conv2d_available()  # once failed, not tried again in this process


# ---------------------------------------------------------------- XLA:CPU options


def _without_backend_query(monkeypatch):
    monkeypatch.delattr(xla_bridge, "backends_are_initialized")


def _unreadable_jaxlib(monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(jaxlib, "__file__", None)  # e.g. a namespace package


@pytest.mark.parametrize(
    "breaker", [_without_backend_query, _unreadable_jaxlib], ids=["xla_bridge", "jaxlib"]
)
def test_xla_cpu_options_that_cannot_be_configured_leave_xla_flags_alone(
    monkeypatch, fresh, breaker
):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(layers.FLAGS_VARIABLE, raising=False)
    monkeypatch.delenv(CONV_VARIABLE, raising=False)
    breaker(monkeypatch)
    with one_warning("XLA:CPU options"):
        assert layers.configure_xla_cpu() == []
        assert layers.configure_xla_cpu() == []  # a second failure: logged, not warned
    assert "XLA_FLAGS" not in os.environ
    assert list(_native.fallbacks()) == [layers.XLA_CPU_FLAGS]
    assert layers.inference_compiler_options() is None  # inference compiles as usual


# ---------------------------------------------------------------- depthwise lowering


def _depthwise_arrays():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 6)), jnp.float32)
    return x, kernel


def _depthwise(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=6
    )


def _by_taps(x, kernel):
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC)
    return depthwise_taps(x, kernel, (2, 2), ((1, 1), (1, 1)), (1, 1), numbers)


def test_depthwise_lowering_that_fails_falls_back_to_xla(monkeypatch, fresh):
    monkeypatch.delenv(CONV_VARIABLE, raising=False)

    def renamed(*args, **kwargs):
        raise KeyError("feature_group_count (simulated: the primitive's parameters changed)")

    monkeypatch.setattr(layers, "_is_depthwise", renamed)
    x, kernel = _depthwise_arrays()
    grads = jax.grad(lambda x, k: jnp.sum(jnp.sin(_depthwise(x, k))), argnums=(0, 1))
    with one_warning("depthwise CPU lowering"):
        text = jax.jit(lambda x, k: _depthwise(x, k)).lower(x, kernel).as_text()
        y = jax.jit(lambda x, k: _depthwise(x, k))(x, kernel)
        dx, dk = jax.jit(lambda x, k: grads(x, k))(x, kernel)
    assert "feature_group_count = 6" in text  # XLA's grouped convolution
    np.testing.assert_allclose(y, jax.jit(_by_taps)(x, kernel), **TOLERANCE)
    reference = jax.grad(lambda x, k: jnp.sum(jnp.sin(_by_taps(x, k))), argnums=(0, 1))
    assert_trees_equal((dx, dk), jax.jit(reference)(x, kernel), **TOLERANCE)
    assert np.abs(np.asarray(y)).max() > 0.1
    assert list(_native.fallbacks()) == [layers.DEPTHWISE_LOWERING]


def _without_jax_lowering(monkeypatch):
    monkeypatch.delattr(convolution, "_conv_general_dilated_lower")


def _failing_lowering_registration(monkeypatch):
    def register(*args, **kwargs):
        raise RuntimeError("simulated: register_lowering refused")

    monkeypatch.setattr(_native.mlir, "register_lowering", register)


@pytest.mark.parametrize(
    "breaker",
    [_without_jax_lowering, _failing_lowering_registration],
    ids=["private-lowering", "registration"],
)
def test_depthwise_lowering_that_cannot_be_installed_warns_once(monkeypatch, fresh, breaker):
    # The lowering of this process stays installed (this test only calls the installer as
    # `import models` would in a fresh process: see the subprocess test below for results).
    monkeypatch.setattr(layers, "_xla_conv_lowering", None)
    breaker(monkeypatch)
    with one_warning("depthwise CPU lowering"):
        assert not layers.install_depthwise_lowering()
    assert layers._xla_conv_lowering is None
    assert list(_native.fallbacks()) == [layers.DEPTHWISE_LOWERING]


# ------------------------------------------------------ an incompatible JAX, end to end

_INCOMPATIBLE_JAX = r"""
import json, os, sys, warnings

import jax
import jax._src.lax.convolution as convolution
import jax._src.xla_bridge as xla_bridge
import jax.interpreters

# A JAX release without the internal APIs ifjax uses.
del xla_bridge.backends_are_initialized
del convolution._conv_general_dilated_lower
vars(jax.interpreters).pop("mlir", None)
sys.modules["jax.interpreters.mlir"] = None

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import models
    from models import _native
    from tests.test_fallbacks import Net, _by_taps, _depthwise, _depthwise_arrays
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 16)), jnp.float32)
    variables = Net().init(jax.random.key(0), x)
    loss = lambda v, x: jnp.sum(jnp.sin(Net().apply(v, x)))
    run = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
    fast = run()
    xd, kernel = _depthwise_arrays()
    depthwise = jax.jit(_depthwise)(xd, kernel)
    os.environ["IFJAX_CONV"] = "xla"
    xla = run()
differences = [
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(xla), strict=True)
]
print(json.dumps({
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "fallbacks": sorted(_native.fallbacks()),
    "xla_flags": os.environ.get("XLA_FLAGS"),
    "difference": max(differences),
    "scale": float(np.max(np.abs(np.asarray(fast[0])))),
    "depthwise": float(np.max(np.abs(np.asarray(depthwise) - np.asarray(_by_taps(xd, kernel))))),
}))
"""


def test_an_incompatible_jax_never_breaks_import_or_results():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IFJAX_CONV", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", _INCOMPATIBLE_JAX],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1, report["warnings"]
    assert report["warnings"][0].startswith("RuntimeWarning: ifjax: XLA:CPU options unavailable")
    assert report["fallbacks"] == sorted(
        [layers.XLA_CPU_FLAGS, layers.DEPTHWISE_LOWERING, _native.NATIVE_CONV]
    )
    assert report["xla_flags"] is None
    assert report["scale"] > 1.0 and report["difference"] < 1e-3
    assert report["depthwise"] < 1e-4
