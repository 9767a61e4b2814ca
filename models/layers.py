"""Layers shared by the models: a ``Conv`` whose convolution is fast on XLA:CPU.

XLA:CPU computes some convolutions far more slowly than the same arithmetic written as
patches followed by one matrix product: a 3x3 convolution over a 2x2 map with 512
channels (VGG11's last two layers on CIFAR) takes seconds instead of milliseconds, in the
forward pass and in the input gradient. :class:`Conv` is ``flax.linen.Conv`` with the
same parameters (``kernel`` HWIO, ``bias``), so checkpoints and the torch loader are
unaffected; on the CPU backend it computes each convolution, and separately its input
and kernel gradients, by whichever of two paths is faster for that shape:

* ``"xla"``: ``lax.conv_general_dilated`` (and its transposes);
* ``"matmul"``: shifted strided slices of the padded input concatenated into patches
  (N, Ho, Wo, kh*kw*I) and multiplied by the kernel reshaped to (kh*kw*I, O); its input
  gradient is the transpose (a matmul, then padded slices summed) and its kernel gradient
  one matrix product of the patches with the output gradient.

* ``"transposed"`` (kernel gradient only): XLA's convolution, its input made batch-minor
  by the native kernel of :mod:`models._native` instead of XLA's slow transpose.
* ``"native"``: the direct AVX-512 float32 kernels of :mod:`models._native`, for the
  convolution (1.1-1.6x faster than XLA's on 3x3 layers), its input gradient (the same
  kernel on the rotated taps, one call per stride phase) and its kernel gradient (1.5-2.8x
  faster than XLA's on 32x32 and 16x16 maps); other dtypes, and CPUs without AVX-512,
  use XLA's.

The choice, :func:`choose_paths`, depends on static shapes only and was measured on a
2-core x86 CPU (``bench/README.md``). Other backends keep ``lax.conv_general_dilated``.
:func:`max_pool` is likewise ``nn.max_pool`` with a faster gradient on CPU, and
:func:`configure_xla_cpu` (called by ``import models``) keeps XLA:CPU's convolutions out of
YNNPACK library fusions, which are slower for them.

Depthwise convolutions (``feature_group_count`` equal to the input channels, one kernel
per channel: MobileNetV2's) are 50-170x slower on XLA:CPU than the same arithmetic as
shifted slices multiplied by the kernel's taps and summed (a 3x3 depthwise convolution
of a (128, 32, 32, 96) batch: 1.3-2.9 s instead of 26 ms), and so are their input
gradients. :func:`install_depthwise_lowering` (called by ``import models``) makes XLA:CPU
compute them that way: the program still holds ``lax.conv_general_dilated`` with its
``feature_group_count`` (what ``ifjax.discover_groups`` analyses, and what gradients
are derived from), only its CPU lowering changes (:func:`depthwise_taps`). Kernel
gradients (batch-grouped convolutions) stay XLA's.

The environment variable ``IFJAX_CONV`` (read whenever a convolution is traced) selects
``"auto"`` (the default: the rule above on CPU, XLA elsewhere), ``"xla"`` (always
``lax.conv_general_dilated``, plain ``nn.Conv``, and plain ``nn.max_pool``) or
``"matmul"`` (the matmul path for every supported convolution, on any backend). A
function that was already traced keeps the choice it was traced with; for depthwise
convolutions, ``"xla"`` when a function is compiled keeps XLA's lowering.

The fast path is a ``jax.jit``-wrapped function named ``conv_general_dilated`` taking
(NHWC input, HWIO kernel, ...), which ``ifjax.discover_groups`` analyses as a
convolution whatever it computes inside.

:func:`configure_xla_cpu` and :func:`install_depthwise_lowering` use JAX-internal APIs
(``jax._src``, ``jax.interpreters.mlir``). Where a JAX release changed them, they leave
plain XLA (``import models`` never fails), with one warning per process
(:func:`models._native.fall_back`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from models import _native

__all__ = [
    "ALL_MATMUL",
    "ALL_XLA",
    "CONV_IMPLEMENTATIONS",
    "CONV_VARIABLE",
    "FLAGS_VARIABLE",
    "XLA_CPU_DEFAULT_OPTIONS",
    "XLA_CPU_INFERENCE_OPTIONS",
    "XLA_CPU_OPTIONS",
    "InferenceJit",
    "inference_compiler_options",
    "inference_jit",
    "Conv",
    "ConvPaths",
    "choose_paths",
    "conv_general_dilated",
    "configure_xla_cpu",
    "conv_implementation",
    "depthwise_taps",
    "dispatch_conv_general_dilated",
    "install_depthwise_lowering",
    "max_pool",
]

CONV_VARIABLE = "IFJAX_CONV"
FLAGS_VARIABLE = "IFJAX_XLA_CPU_FLAGS"
#: XLA:CPU options ifjax sets (see :func:`configure_xla_cpu`): library fusions (YNNPACK) for
#: matrix products and reductions, but not for convolutions.
XLA_CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    ),
}
#: The same options as jaxlib 0.10's defaults (YNNPACK for convolutions too): the "before".
XLA_CPU_DEFAULT_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
        "LIBRARY_FUSION_TYPE_REDUCE"
    ),
}
#: XLA:CPU options for inference-only computations (:func:`inference_jit`): no library
#: fusions at all. With products and reductions in YNNPACK fusions, XLA fuses ResNet18's
#: whole last stage (4x4 convolutions, BatchNorms, pooling, classifier) into one slow
#: YNNPACK fusion; evaluation has no gradient reductions to gain from them.
XLA_CPU_INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
CONV_IMPLEMENTATIONS = ("auto", "xla", "matmul")
XLA_CPU_FLAGS = "XLA:CPU options"  # the features that may fall back (models._native.fall_back)
DEPTHWISE_LOWERING = "depthwise CPU lowering"
_NHWC = ("NHWC", "HWIO", "NHWC")

Padding = tuple[tuple[int, int], ...]


class ConvPaths(NamedTuple):
    """How a convolution and its two gradients are computed: ``"xla"`` or ``"matmul"``,
    for the kernel gradient also ``"transposed"`` (XLA's convolution of the input made
    batch-minor by :func:`models._native.batch_to_minor`), and ``"native"``
    (:func:`models._native.conv2d` and its native gradients for float32, else XLA's).

    Attributes:
      forward: the convolution itself.
      input_grad: its gradient with respect to the input (a transposed convolution).
      kernel_grad: its gradient with respect to the kernel.
    """

    forward: str
    input_grad: str
    kernel_grad: str


ALL_XLA = ConvPaths("xla", "xla", "xla")
ALL_MATMUL = ConvPaths("matmul", "matmul", "matmul")


def conv_implementation() -> str:
    """The value of ``IFJAX_CONV``: ``"auto"`` (default), ``"xla"`` or ``"matmul"``."""
    value = os.environ.get(CONV_VARIABLE, "auto").strip().lower() or "auto"
    if value not in CONV_IMPLEMENTATIONS:
        raise ValueError(f"{CONV_VARIABLE}={value!r}; choose one of {CONV_IMPLEMENTATIONS}")
    return value


def _jaxlib_knows(strings: Sequence[str]) -> bool:
    """Whether jaxlib's XLA library contains every string (flag and enum value names).

    An unknown flag in ``XLA_FLAGS`` aborts the process when the backend starts, so a flag
    is only set when the installed jaxlib is seen to define it.
    """
    import mmap

    import jaxlib

    libraries = sorted(Path(jaxlib.__file__).parent.glob("libjax_common*.so*"))
    libraries = libraries or sorted(Path(jaxlib.__file__).parent.glob("*xla_extension*.so*"))
    for library in libraries:
        try:
            with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if all(m.find(text.encode()) >= 0 for text in strings):
                    return True
        except (OSError, ValueError):
            continue
    return False


def configure_xla_cpu(force: bool = False) -> list[str]:
    """Adds :data:`XLA_CPU_OPTIONS` to ``XLA_FLAGS`` before JAX starts its backends.

    jaxlib 0.10 hands convolutions on the CPU to YNNPACK library fusions. On the 2-core
    x86 machine of ``bench/README.md`` those are up to 4x slower than XLA's own
    convolutions for kernel gradients, and a ResNet18 training step 1.5x slower in all;
    matrix products and reductions stay with YNNPACK. ``import models`` calls this, so
    models built with ifjax and jitted anywhere in the process get it. Nothing is
    changed when

    * JAX's backends are already initialised (flags are read once, at start-up; pass
      the options per computation instead: ``jax.jit(f, compiler_options=XLA_CPU_OPTIONS)``);
    * ``XLA_FLAGS`` already names the flag (the user's choice wins);
    * ``IFJAX_XLA_CPU_FLAGS=0`` or ``IFJAX_CONV=xla`` (plain XLA, the "before" of the
      benchmarks);
    * the installed jaxlib does not define the flag or its values (an unknown flag
      would abort the process);
    * this JAX release changed the internal API that says whether the backends started
      (one warning, :func:`models._native.fall_back`).

    The flags only change how XLA:CPU compiles; results are equal to float tolerance.

    Args:
      force: set the flags even if ``IFJAX_XLA_CPU_FLAGS``/``IFJAX_CONV`` say not to
        (the backend and ``XLA_FLAGS`` checks still apply).

    Returns:
      The flags added (empty when nothing changed).
    """
    if not force and (_native.switched_off(FLAGS_VARIABLE) or conv_implementation() == "xla"):
        return []
    try:  # JAX-internal APIs: whatever this JAX release changed leaves XLA_FLAGS alone
        flags = _new_flags()
    except Exception as error:  # noqa: BLE001
        _native.fall_back(XLA_CPU_FLAGS, error, silence=f"{FLAGS_VARIABLE}=0")
        return []
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    return flags


def _backends_started() -> bool:
    """Whether JAX's backends are initialised (a JAX-internal function)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _new_flags() -> list[str]:
    """The flags :func:`configure_xla_cpu` adds to ``XLA_FLAGS``: none once the backends
    started, none the user set, none the installed jaxlib does not define."""
    if _backends_started():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    flags = [f"--{name}={value}" for name, value in XLA_CPU_OPTIONS.items() if name not in current]
    names = [*XLA_CPU_OPTIONS, *",".join(XLA_CPU_OPTIONS.values()).split(",")]
    if not flags or not _jaxlib_knows(names):
        return []
    return flags


def inference_compiler_options() -> dict[str, str] | None:
    """The compile options :func:`inference_jit` uses on XLA:CPU, or ``None`` for none.

    They are :data:`XLA_CPU_INFERENCE_OPTIONS` while ifjax's process-wide options are in
    effect (``XLA_FLAGS`` holds exactly :data:`XLA_CPU_OPTIONS`, as set by
    :func:`configure_xla_cpu` here or in a parent process), and ``None`` otherwise: after
    ``IFJAX_XLA_CPU_FLAGS=0``, ``IFJAX_CONV=xla``, or a value of the user's own, inference
    is compiled like everything else.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    if all(f"--{name}={value}" in flags for name, value in XLA_CPU_OPTIONS.items()):
        return dict(XLA_CPU_INFERENCE_OPTIONS)
    return None


def _platform(args: tuple, kwargs: dict) -> str | None:
    """The platform a jitted call with these arguments runs on (``None``: under a trace)."""
    for leaf in jax.tree.leaves((args, kwargs)):
        if isinstance(leaf, jax.core.Tracer):
            return None
        if isinstance(leaf, jax.Array) and leaf.committed:
            return next(iter(leaf.devices())).platform
    return jax.default_backend()


class InferenceJit:
    """``jax.jit(fun)`` that compiles with :func:`inference_compiler_options` on XLA:CPU.

    XLA's compile options are per executable, and the options that make training steps
    faster on the CPU (:data:`XLA_CPU_OPTIONS`) make ResNet18's evaluation slower
    (``bench/README.md``). A call whose arguments live on the CPU (or, for uncommitted
    arguments, with the CPU as the default backend) runs an executable compiled with
    the inference options; any other call, and a call under an outer trace (where the
    outer function's options apply), runs the plain ``jax.jit``. Results are equal to
    float tolerance: the options only change how XLA:CPU compiles.

    Attributes:
      __wrapped__: the function itself.
    """

    def __init__(self, fun, **jit_kwargs: Any):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs = fun, jit_kwargs
        self._plain = jax.jit(fun, **jit_kwargs)
        self._tuned = None  # compiled with the inference options, made on first use

    def _jit_for(self, args: tuple, kwargs: dict):
        options = inference_compiler_options()
        if options is None or _platform(args, kwargs) != "cpu":
            return self._plain
        if self._tuned is None:
            self._tuned = jax.jit(self._fun, compiler_options=options, **self._jit_kwargs)
        return self._tuned

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._jit_for(args, kwargs)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).lower`` of the executable this call would run."""
        return self._jit_for(args, kwargs).lower(*args, **kwargs)

    def _jits(self) -> list:
        return [self._plain] + ([] if self._tuned is None else [self._tuned])

    def _cache_size(self) -> int:
        return sum(f._cache_size() for f in self._jits())

    def clear_cache(self) -> None:
        for f in self._jits():
            f.clear_cache()


def inference_jit(fun=None, **jit_kwargs: Any):
    """Decorator form of :class:`InferenceJit`: ``@inference_jit(static_argnames=...)``.

    Example:
      >>> @inference_jit(static_argnames=("model",))
      ... def logits(variables, x, *, model):
      ...     return model.apply(variables, x, train=False)
    """
    if fun is None:
        return functools.partial(inference_jit, **jit_kwargs)
    return InferenceJit(fun, **jit_kwargs)


def _output_size(size: int, kernel: int, stride: int, padding: tuple[int, int]) -> int:
    return (size + padding[0] + padding[1] - kernel) // stride + 1


def choose_paths(
    input_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Padding,
    native: bool | None = None,
    native_conv: bool | None = None,
    native_grads: bool | None = None,
) -> ConvPaths:
    """The faster paths on XLA:CPU for a 2-D convolution of these static shapes.

    Measured rules (batch 128, isolated layers and whole training steps of VGG11-BN and
    ResNet18, with the XLA flags of :func:`configure_xla_cpu`; see ``bench/README.md``):

    * an output map smaller than the kernel (e.g. 3x3 on a 2x2 map, padding 1): XLA is
      10x-200x slower in the forward pass and the input gradient, so all matmul;
    * 1x1 kernels: a plain matrix product (of strided slices for stride 2) is faster in
      the input and kernel gradients and as fast in the forward pass;
    * strided kernels and output maps of at most 16 positions (4x4): the input gradient as
      a matmul. XLA computes a strided input gradient as a convolution of the dilated
      output gradient (up to 1.5x slower) and is 1.6x slower on 4x4 maps;
    * otherwise XLA's convolution in every direction: a materialised patch matrix is 9x
      larger than the activations and memory bound on a CPU, so XLA's kernels win (up to
      6x);
    * kernel gradients other than the matmul ones: ``"transposed"`` (XLA's convolution,
      its input transposed by the native kernel of :mod:`models._native`, 1.1x faster
      ResNet18 training steps) when that kernel is available, else ``"xla"``;
    * with the native kernels (:mod:`models._native`: an AVX-512 CPU, float32), every
      kernel but 1x1 computes its forward pass, kernel gradient and input gradient
      natively (1.1-1.6x, 1.0-2.8x and 1.2-2.9x faster than XLA on ResNet18's 3x3 layers,
      100x on 2x2 maps), except the input gradient of output maps smaller than the
      kernel (VGG's 2x2 maps), where the matmul path is faster.
      ``IFJAX_NATIVE_CONV=forward`` (``native_grads=False``) keeps the rules above for
      the gradients.

    Args:
      input_shape: (N, H, W, I).
      kernel_shape: (kh, kw, I, O).
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)).
      native: whether the native transpose kernel is available; ``None``: find out
        (building it on first use, see :mod:`models._native`).
      native_conv: whether the native convolution is available (the same library, an
        AVX-512 CPU, ``IFJAX_NATIVE_CONV`` not ``0``); ``None``: find out.
      native_grads: whether its gradients are native too (``IFJAX_NATIVE_CONV`` not
        ``forward``); ``None``: find out.

    Returns:
      The :class:`ConvPaths` to use.
    """
    kh, kw = kernel_shape[:2]
    out_h = _output_size(input_shape[1], kh, strides[0], padding[0])
    out_w = _output_size(input_shape[2], kw, strides[1], padding[1])
    if (kh, kw) == (1, 1):
        return ALL_MATMUL
    if native_conv is None:
        native_conv = _native.conv2d_available()
    small = out_h < kh or out_w < kw
    if native_grads is None:
        native_grads = native_conv and _native.native_conv_gradients()
    if native_conv and native_grads:
        return ConvPaths("native", "matmul" if small else "native", "native")
    forward = "native" if native_conv else None
    if small:
        return ConvPaths(forward or "matmul", "matmul", "matmul")
    if native is None:
        native = _native.native_available()
    kernel_grad = "transposed" if native else "xla"
    if max(strides) > 1 or out_h * out_w <= 16:
        return ConvPaths(forward or "xla", "matmul", kernel_grad)
    return ConvPaths(forward or "xla", "xla", kernel_grad)


# ----------------------------------------------------------------------------- the paths


def _xla_conv(x, kernel, strides, padding, precision):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
    )


def _patches(x: jax.Array, kernel_size: tuple[int, int], strides, padding) -> jax.Array:
    """(N, H, W, I) -> (N, Ho, Wo, kh*kw*I), taps in the (kh, kw, I) order of HWIO."""
    (kh, kw), (sh, sw) = kernel_size, strides
    if any(p != (0, 0) for p in padding):
        pads = ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0))
        x = lax.pad(x, jnp.zeros((), x.dtype), pads)
    n, h, w, c = x.shape
    out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
    taps = [
        lax.slice(
            x,
            (0, i, j, 0),
            (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _matmul_conv(x, kernel, strides, padding, precision):
    patches = _patches(x, kernel.shape[:2], strides, padding)
    matrix = kernel.reshape(-1, kernel.shape[-1])
    return lax.dot_general(patches, matrix, (((3,), (0,)), ((), ())), precision=precision)


def _native_conv(x, kernel, strides, padding, precision):
    """:func:`models._native.conv2d` for float32 on the CPU backend, else ``_xla_conv``."""
    float32 = x.dtype == jnp.float32 and kernel.dtype == jnp.float32
    if float32 and jax.default_backend() == "cpu" and _native.conv2d_available():
        return _native.conv2d(x, kernel, strides, padding)
    return _xla_conv(x, kernel, strides, padding, precision)


def _transposed_conv(x_t, kernel, strides, padding, precision):
    """``_xla_conv`` of an input given batch-minor, ``x_t`` (C, H, W, N).

    Used for the kernel gradient: transposed with respect to the kernel, this is the
    convolution of ``x_t`` with the output gradient in XLA:CPU's canonical layout, so XLA
    writes no (slow) transpose of the activations of its own; ``x_t`` comes from
    :func:`models._native.batch_to_minor`.
    """
    numbers = ("CHWN", "HWIO", "NHWC")
    return lax.conv_general_dilated(
        x_t, kernel, strides, padding, dimension_numbers=numbers, precision=precision
    )


def _kernel_term(path, x, kernel_dot, strides, padding, precision):
    """The kernel-gradient term of the tangent, computed by ``path``."""
    if path == "transposed":
        x_t = _native.batch_to_minor(x)
        return _transposed_conv(x_t, kernel_dot, strides, padding, precision)
    return _PATH_FUNCTIONS[path](x, kernel_dot, strides, padding, precision)


_PATH_FUNCTIONS = {"xla": _xla_conv, "matmul": _matmul_conv, "native": _native_conv}


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, padding, paths: ConvPaths, precision):
    return _PATH_FUNCTIONS[paths.forward](x, kernel, strides, padding, precision)


def _conv_jvp(strides, padding, paths, precision, primals, tangents):
    """The tangent is linear in (dx, dkernel); its transposes are the two gradients, each
    computed by the path chosen for it. Zero tangents (e.g. the input images) cost
    nothing."""
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = _conv(x, kernel, strides, padding, paths, precision)
    terms = []
    if not isinstance(x_dot, SymbolicZero):
        terms.append(_PATH_FUNCTIONS[paths.input_grad](x_dot, kernel, strides, padding, precision))
    if not isinstance(kernel_dot, SymbolicZero):
        terms.append(_kernel_term(paths.kernel_grad, x, kernel_dot, strides, padding, precision))
    y_dot = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
    return y, y_dot


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnames=("strides", "padding", "paths", "precision"))
def conv_general_dilated(
    inputs: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    paths: ConvPaths | None = None,
    precision: Any = None,
) -> jax.Array:
    """A 2-D convolution (NHWC input, HWIO kernel) computed by the given paths.

    Equal to ``lax.conv_general_dilated(inputs, kernel, strides, padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`` to float tolerance, gradients included.
    Its name and its first two arguments make ``ifjax.discover_groups`` analyse it as a
    convolution.

    Args:
      inputs: (N, H, W, I).
      kernel: (kh, kw, I, O).
      strides: (sh, sw), static.
      padding: ((top, bottom), (left, right)), static.
      paths: static :class:`ConvPaths`; ``None``: :func:`choose_paths`.
      precision: ``lax.Precision`` for the products, static.

    Returns:
      (N, Ho, Wo, O).

    Example:
      >>> y = conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), ALL_MATMUL)
    """
    if paths is None:
        paths = choose_paths(inputs.shape, kernel.shape, strides, padding)
    return _conv(inputs, kernel, strides, padding, paths, precision)


# ----------------------------------------------------------------------------- dispatch


def _normalized(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, numbers):
    """(strides, padding) of a plain NHWC/HWIO 2-D convolution, or None for anything else."""
    if lhs.ndim != 4 or rhs.ndim != 4 or numbers is None:
        return None
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, numbers) != expected:
        return None
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return None
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in padding for p in pair) or lhs.shape[3] != rhs.shape[2]:
        return None
    sizes = zip(lhs.shape[1:3], rhs.shape[:2], strides, padding, strict=True)
    if any(_output_size(*s) < 1 for s in sizes):
        return None
    return strides, padding


def dispatch_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` that takes the faster path on CPU.

    Plain 2-D NHWC/HWIO convolutions (no dilation, no groups) go to
    :func:`conv_general_dilated` when ``IFJAX_CONV`` asks for it (see the module
    docstring) and :func:`choose_paths` does not pick XLA for every direction; anything
    else is ``lax.conv_general_dilated`` unchanged.
    """
    plain = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
    implementation = conv_implementation()
    if implementation == "xla" or (implementation == "auto" and jax.default_backend() != "cpu"):
        return plain()
    if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None:
        return plain()
    normalized = _normalized(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers
    )
    if normalized is None:
        return plain()
    strides, pads = normalized
    paths = (
        ALL_MATMUL
        if implementation == "matmul"
        else choose_paths(lhs.shape, rhs.shape, *normalized)
    )
    if paths == ALL_XLA:
        return plain()
    return conv_general_dilated(lhs, rhs, strides, pads, paths, precision)


# ----------------------------------------------------------------------------- pooling


def _window_view(x: jax.Array, window: tuple[int, int], out: tuple[int, int]) -> jax.Array:
    """(N, H, W, C) cropped to whole windows -> (N, Ho, wh, Wo, ww, C)."""
    (wh, ww), (oh, ow) = window, out
    x = x[:, : oh * wh, : ow * ww]
    return x.reshape(x.shape[0], oh, wh, ow, ww, x.shape[-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    dims = (1, *window, 1)
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, dims, "VALID")


@_max_pool.defjvp
def _max_pool_jvp(window, primals, tangents):
    """The tangent of the first maximum of each window (row-major order), as
    ``select_and_scatter`` routes the gradient; its transpose is one elementwise fusion."""
    (x,), (x_dot,) = primals, tangents
    y = _max_pool(x, window)
    out = y.shape[1:3]
    wh, ww = window
    position = (jnp.arange(wh)[:, None] * ww + jnp.arange(ww)).reshape(1, 1, wh, 1, ww, 1)
    is_max = _window_view(x, window, out) == y[:, :, None, :, None, :]
    first = jnp.min(jnp.where(is_max, position, wh * ww), axis=(2, 4), keepdims=True)
    taken = position == first
    y_dot = jnp.sum(jnp.where(taken, _window_view(x_dot, window, out), 0), axis=(2, 4))
    return y, y_dot.astype(y.dtype)


def max_pool(
    inputs: jax.Array,
    window_shape: tuple[int, int],
    strides: tuple[int, int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """``nn.max_pool`` whose gradient is fast on XLA:CPU for non-overlapping windows.

    XLA:CPU lowers the max-pool gradient (``select_and_scatter``) to an indexed
    reduce-window, iotas and a scatter: ~25% of a VGG11-BN training step. For 2-D
    windows equal to the strides without padding (e.g. 2x2, stride 2) on CPU (see
    ``IFJAX_CONV`` in the module docstring), the forward pass is the same
    ``reduce_window`` and the gradient goes to the first maximum of each window, as
    ``select_and_scatter`` does, computed elementwise. Anything else is ``nn.max_pool``.

    Args:
      inputs: (N, H, W, C).
      window_shape: (wh, ww).
      strides: (sh, sw); ``None``: (1, 1), as ``nn.max_pool``.
      padding: as ``nn.max_pool``.

    Returns:
      (N, Ho, Wo, C).

    Example:
      >>> y = max_pool(x, (2, 2), strides=(2, 2))
    """
    window = tuple(int(w) for w in window_shape)
    implementation = conv_implementation()
    fast = implementation == "matmul" or (
        implementation == "auto" and jax.default_backend() == "cpu"
    )
    unpadded = padding == "VALID" or (
        not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding)
    )
    tiles = (
        inputs.ndim == 4
        and len(window) == 2
        and strides is not None
        and tuple(strides) == window
        and window[0] <= inputs.shape[1]
        and window[1] <= inputs.shape[2]
    )
    if fast and unpadded and tiles:
        return _max_pool(inputs, window)
    return nn.max_pool(inputs, window_shape, strides=strides, padding=padding)


# ----------------------------------------------------------------------- depthwise


def depthwise_taps(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int],
    dimension_numbers: lax.ConvDimensionNumbers,
) -> jax.Array:
    """A 2-D depthwise convolution (channel multiplier 1) as a sum of shifted slices.

    Equal to ``lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
    dimension_numbers=dimension_numbers, feature_group_count=C)`` for ``C`` input
    channels and a kernel with one input and ``C`` output features, to float tolerance:
    the input is padded (and dilated), and each kernel tap multiplies one strided slice
    of it, channel by channel. Elementwise work XLA:CPU fuses into one loop.

    Args:
      lhs: input, laid out as ``dimension_numbers.lhs_spec`` says.
      rhs: kernel, one input feature, laid out as ``dimension_numbers.rhs_spec`` says.
      window_strides: (sh, sw).
      padding: ((lo, hi), (lo, hi)), negative entries crop.
      lhs_dilation: (dh, dw) (a strided convolution's input gradient has 2).
      dimension_numbers: as ``lax.conv_general_dilated``'s, normalized.

    Returns:
      The output, laid out as ``dimension_numbers.out_spec`` says.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # NHWC
    kernel = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))[:, :, 0]  # HWC
    config = [
        (0, 0, 0),
        *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation, strict=True)),
        (0, 0, 0),
    ]
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
    n, height, width, c = x.shape
    (kh, kw), (sh, sw) = kernel.shape[:2], window_strides
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            end = (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c)
            tap = lax.slice(x, (0, i, j, 0), end, (1, sh, sw, 1)) * kernel[i, j]
            y = tap if y is None else y + tap
    order = (out_spec[0], *out_spec[2:], out_spec[1])
    return jnp.transpose(y, [order.index(axis) for axis in range(4)])


def _is_depthwise(lhs_aval, rhs_aval, out_aval, params: dict[str, Any]) -> bool:
    """Whether a ``conv_general_dilated`` is one :func:`depthwise_taps` computes."""
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    groups = params["feature_group_count"]
    return (
        len(lhs_aval.shape) == 4
        and groups > 1
        and params["batch_group_count"] == 1
        and lhs_aval.shape[lhs_spec[1]] == groups
        and rhs_aval.shape[rhs_spec[1]] == 1
        and rhs_aval.shape[rhs_spec[0]] == groups
        and all(d == 1 for d in params["rhs_dilation"])
        and jnp.issubdtype(lhs_aval.dtype, jnp.floating)
        and lhs_aval.dtype == rhs_aval.dtype == out_aval.dtype
        and all(size > 0 for size in out_aval.shape)
    )


_xla_conv_lowering = None  # XLA's lowering of conv_general_dilated, once installed


def _depthwise_cpu_lowering(ctx, lhs, rhs, **params):
    """The CPU lowering of ``conv_general_dilated``: depthwise ones by
    :func:`depthwise_taps` (unless ``IFJAX_CONV=xla``), others as XLA's. If lowering by
    taps fails (e.g. this JAX release changed the primitive's parameters), XLA's, with
    one warning."""
    if conv_implementation() != "xla" and not _native.fell_back(DEPTHWISE_LOWERING):
        try:
            lowered = _lower_depthwise(ctx, lhs, rhs, params)
        except Exception as error:  # noqa: BLE001 - whatever this JAX release changed
            _native.fall_back(DEPTHWISE_LOWERING, error)
        else:
            if lowered is not None:
                return lowered
    return _xla_conv_lowering(ctx, lhs, rhs, **params)


def _lower_depthwise(ctx, lhs, rhs, params: dict[str, Any]):
    """The lowering of a depthwise convolution by :func:`depthwise_taps`; ``None`` for
    other convolutions."""
    from jax.interpreters import mlir

    (lhs_aval, rhs_aval), (out_aval,) = ctx.avals_in, ctx.avals_out
    if not _is_depthwise(lhs_aval, rhs_aval, out_aval, params):
        return None
    taps = functools.partial(
        depthwise_taps,
        window_strides=tuple(params["window_strides"]),
        padding=tuple(tuple(p) for p in params["padding"]),
        lhs_dilation=tuple(params["lhs_dilation"]),
        dimension_numbers=params["dimension_numbers"],
    )
    return mlir.lower_fun(taps, multiple_results=False)(ctx, lhs, rhs)


def _jax_conv_lowering():
    """JAX's own lowering of ``conv_general_dilated`` (a JAX-internal function)."""
    from jax._src.lax.convolution import _conv_general_dilated_lower

    return _conv_general_dilated_lower


def install_depthwise_lowering() -> bool:
    """Makes XLA:CPU compute depthwise convolutions by :func:`depthwise_taps`.

    Registers a CPU lowering of ``lax.conv_general_dilated`` that computes depthwise
    convolutions (channel multiplier 1, no kernel dilation, 2-D, floating point; e.g.
    ``nn.Conv(C, (3, 3), feature_group_count=C)`` and, in the gradient, its input
    gradient) as :func:`depthwise_taps` and every other convolution as before. Programs,
    jaxprs and other backends are unchanged; results equal XLA's to float tolerance.
    ``import models`` calls this; it applies to computations compiled afterwards.
    ``IFJAX_CONV=xla`` at compile time keeps XLA's lowering.

    Returns:
      Whether the lowering is installed (``False``, with one warning, if this JAX release
      has no lowering of ``conv_general_dilated`` to fall back on, or registering fails:
      XLA's lowering stays).
    """
    global _xla_conv_lowering
    if _xla_conv_lowering is not None:
        return True
    try:  # JAX-internal APIs: any failure leaves XLA's lowering, with one warning
        from jax.interpreters import mlir

        _xla_conv_lowering = _jax_conv_lowering()
        mlir.register_lowering(lax.conv_general_dilated_p, _depthwise_cpu_lowering, platform="cpu")
    except Exception as error:  # noqa: BLE001 - whatever this JAX release changed
        _xla_conv_lowering = None
        _native.fall_back(DEPTHWISE_LOWERING, error)
        return False
    return True


class Conv(nn.Conv):
    """``flax.linen.Conv`` computed by :func:`dispatch_conv_general_dilated`.

    Same attributes, parameters (``kernel`` (kh, kw, I, O), ``bias`` (O,)) and results
    as ``nn.Conv`` (to float tolerance); faster on XLA:CPU.

    Example:
      >>> y = Conv(64, (3, 3), padding=1, name="conv0")(x)
    """

    conv_general_dilated: Any = dispatch_conv_general_dilated
