"""Native CPU kernels for what XLA:CPU does slowly, built on first use.

Kernels registered with XLA as FFI custom calls:

* :func:`batch_to_minor`, a transpose (``models/_kernels/transpose.cc``);
* :func:`conv2d`, a direct float32 convolution for CPUs with AVX-512
  (``models/_kernels/conv.cc``): a block of 6 output pixels x 64 output channels held in
  vector registers, 1.2-2x faster than XLA:CPU's convolution on ResNet18's 3x3 layers
  (``bench/README.md``). It runs on XLA's intra-op thread pool. It is differentiable:
  its input gradient (:func:`conv2d_input_grad`) is the same kernel run on the output
  gradient with the taps rotated (one call per phase of the stride), and its kernel gradient
  (:func:`conv2d_kernel_grad`) a second kernel that accumulates blocks of 6 input x 64
  output channels over all pixels in registers (2-4x faster than XLA's on the large
  maps). The three are JAX primitives, each the transpose of the others, so derivatives
  of any order, forward mode and ``vmap`` work.

XLA:CPU computes the kernel gradient of a convolution as a convolution whose input is the
activations transposed from (N, H, W, C) to (C, H, W, N). It writes that transpose element by
element, reading one float per cache line: in a ResNet18 training step on a 2-core x86 CPU
these transposes took ~35% of the step. :func:`batch_to_minor` does the same transpose with a
small C++ kernel (contiguous tile copies and blocked transposes, 4-10x faster).

The kernels are compiled with the system's C++ compiler (``$CXX``, else ``c++``/``g++``)
against the FFI headers that jaxlib ships (``jax.ffi.include_dir()``), once per source,
jaxlib version and compiler, into ``$IFJAX_CACHE_DIR/kernels`` (default
``~/.cache/ifjax/kernels``; the temporary directory if that cannot be created), written
atomically. Without a compiler, or if the build fails,
or with ``IFJAX_NATIVE=0``, :func:`batch_to_minor` is ``jnp.transpose`` (same results) and a
warning says why once. :func:`conv2d_available` is false then, on CPUs without AVX-512 and
with ``IFJAX_NATIVE_CONV=0``; :mod:`models.layers` then uses XLA's convolution.
``IFJAX_NATIVE_CONV=forward`` keeps the kernel for the convolutions themselves but leaves
their gradients to XLA (the "before" of the benchmarks).

The primitives use JAX-internal modules (``jax.interpreters.ad``, ``batching``, ``mlir``)
that a JAX release may change. Whatever fails (their import or registration here, the
kernel's build, load or FFI registration, a native lowering), ifjax computes plain XLA
instead: importing never fails, and :func:`fall_back` warns once per process
(:func:`fallbacks` lists every fallback and its reason).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

try:  # JAX-internal modules (no stability promise): without them, XLA's convolutions
    from jax.interpreters import ad, batching, mlir
except Exception as _error:  # noqa: BLE001 - whatever an incompatible JAX release raises
    ad = batching = mlir = None
    _INTERPRETERS_ERROR: Exception | None = _error
else:
    _INTERPRETERS_ERROR = None

__all__ = [
    "NATIVE_CONV_VARIABLE",
    "NATIVE_VARIABLE",
    "batch_to_minor",
    "conv2d",
    "conv2d_available",
    "conv2d_input_grad",
    "conv2d_kernel_grad",
    "fall_back",
    "fallbacks",
    "native_available",
    "native_conv_gradients",
]

NATIVE_VARIABLE = "IFJAX_NATIVE"
NATIVE_CONV_VARIABLE = "IFJAX_NATIVE_CONV"
_SOURCES = tuple(
    Path(__file__).with_name("_kernels") / name for name in ("transpose.cc", "conv.cc")
)
_TARGET = "ifjax_batch_to_minor"
_SYMBOL = "IfjaxBatchToMinor"
_CONV_TARGET = "ifjax_conv2d"
_CONV_SYMBOL = "IfjaxConv2d"
_CONV_SUPPORTED = "IfjaxConvSupported"
_KERNEL_GRAD_TARGET = "ifjax_conv2d_kernel_grad"
_KERNEL_GRAD_SYMBOL = "IfjaxConv2dKernelGrad"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
_lock = threading.Lock()
_registered: list[str] = []  # the library registered with XLA in this process, if any
_conv_supported: list[bool] = []  # whether this CPU runs the convolution kernel (AVX-512)
_log = logging.getLogger(__name__)
#: What fell back to plain XLA in this process, and why (see :func:`fall_back`).
_fallbacks: dict[str, str] = {}
NATIVE_KERNEL = "native CPU kernel"
NATIVE_CONV = "native convolution"


def fall_back(what: str, error: BaseException, silence: str = "") -> None:
    """Records that ``what`` falls back to plain XLA because of ``error``.

    The first fallback of the process warns (one ``RuntimeWarning``), later ones (of other
    features, or again of the same) are only logged: an incompatible JAX release or a
    missing compiler costs speed, never a run, and says so once.

    Args:
      what: the feature, e.g. :data:`NATIVE_KERNEL`.
      error: why it is unavailable.
      silence: how to switch the feature off (e.g. ``"IFJAX_NATIVE=0"``), for the warning.
    """
    reason = f"{type(error).__name__}: {error}"
    first = not _fallbacks
    _fallbacks.setdefault(what, reason)
    if not first:
        _log.info("ifjax: %s unavailable (%s); using plain XLA", what, reason)
        return
    hint = f"; set {silence} to silence" if silence else ""
    warnings.warn(
        f"ifjax: {what} unavailable ({reason}); using plain XLA instead (same results, "
        f"slower on CPU{hint}; further fallbacks: models._native.fallbacks())",
        RuntimeWarning,
        stacklevel=3,
    )


def fallbacks() -> dict[str, str]:
    """What fell back to plain XLA in this process (:func:`fall_back`), and why."""
    return dict(_fallbacks)


def fell_back(what: str) -> bool:
    """Whether ``what`` fell back to plain XLA in this process."""
    return what in _fallbacks


def switched_off(variable: str) -> bool:
    """Whether the environment variable says no (``0``, ``false``, ``no``, ``off``)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("IFJAX_CACHE_DIR") or Path.home() / ".cache" / "ifjax"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> Path:
    """The compiled library, built now if the cache does not have it yet."""
    import jaxlib

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
    sources = [path.read_bytes() for path in _SOURCES]
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    parts = [*sources, jaxlib.__version__.encode(), version.encode(), " ".join(_FLAGS).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: build per user in the temporary directory
        directory = Path(tempfile.gettempdir()) / f"ifjax-kernels-{os.getuid()}"
        directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"kernels-{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        include = ["-I", jax.ffi.include_dir()]
        command = [compiler, *_FLAGS, *include, *map(str, _SOURCES), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)  # atomic: concurrent builders each write a whole file
    _log.info("built %s", library)
    return library


@functools.cache
def _load() -> bool:
    """Builds, loads and registers the kernels once per process; False if unavailable."""
    if switched_off(NATIVE_VARIABLE):
        return False
    with _lock:
        if _registered:  # a target is registered once per process
            return True
        try:
            path = _build()
            library = ctypes.cdll.LoadLibrary(str(path))
            targets = (
                (_TARGET, _SYMBOL),
                (_CONV_TARGET, _CONV_SYMBOL),
                (_KERNEL_GRAD_TARGET, _KERNEL_GRAD_SYMBOL),
            )
            for target, symbol in targets:
                capsule = jax.ffi.pycapsule(getattr(library, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
            _conv_supported.append(bool(getattr(library, _CONV_SUPPORTED)()))
            _registered.append(str(path))
        except Exception as error:  # noqa: BLE001 - any failure means: use the XLA transpose
            fall_back(NATIVE_KERNEL, error, silence=f"{NATIVE_VARIABLE}=0")
            return False
    return True


def native_available() -> bool:
    """Whether :func:`batch_to_minor` runs the native kernel (building it if needed)."""
    return _load()


def batch_to_minor(x: jax.Array) -> jax.Array:
    """``jnp.transpose(x, (3, 1, 2, 0))``: (N, H, W, C) -> (C, H, W, N), fast on CPU.

    On the CPU backend, with the native kernel available, an XLA custom call; elsewhere
    ``jnp.transpose``. Results are identical (a copy). Batched by ``vmap`` (the kernel
    takes a leading batch dimension).
    """
    if x.ndim != 4 or jax.default_backend() != "cpu" or not _load():
        return jnp.transpose(x, (3, 1, 2, 0))
    n, h, w, c = x.shape
    call = jax.ffi.ffi_call(
        _TARGET, jax.ShapeDtypeStruct((1, c, h * w, n), x.dtype), vmap_method="sequential"
    )
    return call(x.reshape(1, n, h * w, c), threads=np.int64(1)).reshape(c, h, w, n)


def conv2d_available() -> bool:
    """Whether :func:`conv2d` runs the native kernel: the library is available, the CPU has
    AVX-512 and ``IFJAX_NATIVE_CONV`` is not ``0`` (read at every call, i.e. whenever a
    convolution is traced)."""
    if switched_off(NATIVE_CONV_VARIABLE) or not _load():
        return False
    if not (_conv_supported and _conv_supported[0]) or fell_back(NATIVE_CONV):
        return False
    if _PRIMITIVES is None:  # this JAX release could not define them (see below)
        fall_back(NATIVE_CONV, _PRIMITIVES_ERROR, silence=f"{NATIVE_CONV_VARIABLE}=0")
        return False
    return True


def native_conv_gradients() -> bool:
    """Whether :mod:`models.layers` computes convolution gradients natively too:
    :func:`conv2d_available`, and ``IFJAX_NATIVE_CONV`` is not ``forward`` (the forward
    pass only, gradients by XLA: the "before" of ``bench/README.md``)."""
    value = os.environ.get(NATIVE_CONV_VARIABLE, "").strip().lower()
    return value != "forward" and conv2d_available()


# ------------------------------------------------------------ convolution primitives
#
# Three bilinear primitives, each the transpose of the others in one argument, so that
# forward- and reverse-mode derivatives of any order stay native:
#
#   conv:        y  = conv(x, w)
#   input_grad:  dx = conv(., w)^T dy   (a convolution of dy with w rotated and transposed)
#   kernel_grad: dw = conv(x, .)^T dy
#
# On the CPU, for float32 on a CPU that runs the kernel, they lower to the native custom
# calls (input_grad to one stride-1 convolution per phase of the stride); everywhere else
# to XLA's convolutions (their reference).

Padding = tuple[tuple[int, int], tuple[int, int]]
_NHWC = ("NHWC", "HWIO", "NHWC")


def _reference_conv(x, w, *, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _reference_input_grad(dy, w, *, strides, padding, input_shape):
    shape = jax.ShapeDtypeStruct((dy.shape[0], *input_shape, w.shape[2]), dy.dtype)

    def conv(x):  # padded explicitly: XLA:CPU (jaxlib 0.10.2) computes the input gradient
        # wrongly for some paddings larger than the kernel, e.g. ((3, 0), (2, 2)) with 2x2
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
        return _reference_conv(x, w, strides=strides, padding=((0, 0), (0, 0)))

    return jax.linear_transpose(conv, shape)(dy)[0]


def _reference_kernel_grad(x, dy, *, strides, padding, kernel_size):
    shape = jax.ShapeDtypeStruct((*kernel_size, x.shape[3], dy.shape[3]), x.dtype)
    conv = functools.partial(_reference_conv, x, strides=strides, padding=padding)
    return jax.linear_transpose(conv, shape)(dy)[0]


def _output_shape(x_shape, kernel_size, strides, padding) -> tuple[int, int]:
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, k, s, (lo, hi) in zip(x_shape[1:3], kernel_size, strides, padding, strict=True)
    )


def _lower_reference(reference):
    """The lowering of a primitive computed as ``reference`` (XLA's convolutions)."""
    return mlir.lower_fun(reference, multiple_results=False)


def _make_primitive(name: str, reference, shape_of):
    primitive = jax.extend.core.Primitive(name)
    shaped_array = jax.core.ShapedArray  # looked up now: a JAX without it fails here

    @functools.cache
    def jitted(**params):
        return jax.jit(functools.partial(primitive.bind, **params))

    primitive.def_impl(lambda a, b, **params: jitted(**params)(a, b))
    primitive.def_abstract_eval(
        lambda a, b, **params: shaped_array(shape_of(a.shape, b.shape, **params), a.dtype)
    )
    mlir.register_lowering(primitive, _lower_reference(reference))
    return primitive


def _conv_shape(x, w, *, strides, padding):
    return (x[0], *_output_shape(x, w[:2], strides, padding), w[3])


def _input_grad_shape(dy, w, *, strides, padding, input_shape):
    return (dy[0], *input_shape, w[2])


def _kernel_grad_shape(x, dy, *, strides, padding, kernel_size):
    return (*kernel_size, x[3], dy[3])


def _attributes(strides, padding) -> dict[str, np.int64]:
    (sh, sw), ((top, bottom), (left, right)) = strides, padding
    values = dict(sh=sh, sw=sw, top=top, bottom=bottom, left=left, right=right)
    return {k: np.int64(v) for k, v in values.items()}


def _native_ok(ctx) -> bool:
    return all(a.dtype == np.float32 for a in ctx.avals_in) and conv2d_available()


def _lower(ctx, native, reference, *operands, **params):
    """``native(ctx, ...)`` for float32 where the native convolution is available, else
    (or if that lowering fails, e.g. in another JAX release: one warning) the lowering of
    ``reference``, XLA's convolutions."""
    try:
        if _native_ok(ctx):
            return native(ctx, *operands, **params)
    except Exception as error:  # noqa: BLE001 - whatever this JAX release changed
        fall_back(NATIVE_CONV, error, silence=f"{NATIVE_CONV_VARIABLE}=0")
    return _lower_reference(reference)(ctx, *operands, **params)


def _native_conv(ctx, x, w, *, strides, padding):
    return jax.ffi.ffi_lowering(_CONV_TARGET)(
        ctx, x, w, flip=np.int64(0), **_attributes(strides, padding)
    )


def _cpu_conv(ctx, x, w, **params):
    return _lower(ctx, _native_conv, _reference_conv, x, w, **params)


class _Phase(NamedTuple):
    """One phase of a strided input gradient along one spatial axis: the input rows
    ``first, first + s, ...`` (``count`` of them) get the taps ``a, a + s, ...`` (``taps``
    of them), as a stride-1 convolution of the output gradient padded by ``pad`` (negative:
    cropped) with those taps rotated."""

    a: int
    taps: int
    first: int
    count: int
    pad: tuple[int, int]


def _phases(k: int, s: int, lo: int, size: int, out: int) -> list[_Phase]:
    # dx[h] = sum_t dy[q - t] w[a + s t] for h + lo = q s + a: one phase per residue a.
    phases = []
    for a in range(s):
        taps = max(0, -(-(k - a) // s))
        q0, q1 = -(-(lo - a) // s), (size - 1 + lo - a) // s
        count = max(0, q1 - q0 + 1)
        before = taps - 1 - q0
        phases.append(
            _Phase(a, taps, q0 * s + a - lo, count, (before, count + taps - 1 - out - before))
        )
    return phases


def _phase_input_grad(dy, w, *, strides, padding, input_shape):
    """The input gradient as stride-1 native convolutions, one per phase (s_h x s_w of
    them), interleaved into dx by XLA (for stride 1: one convolution, nothing to
    interleave)."""
    n, c = dy.shape[0], w.shape[2]
    axes = [
        _phases(k, s, lo, size, out)
        for k, s, (lo, _), size, out in zip(
            w.shape[:2], strides, padding, input_shape, dy.shape[1:3], strict=True
        )
    ]
    rows = [-(-size // s) for size, s in zip(input_shape, strides, strict=True)]
    grid = [[None] * strides[1] for _ in range(strides[0])]
    for ph in axes[0]:
        for pw in axes[1]:
            shape = (n, ph.count, pw.count, c)
            if ph.taps == 0 or pw.taps == 0 or ph.count == 0 or pw.count == 0:
                z = jnp.zeros(shape, dy.dtype)
            else:
                sub = jax.lax.slice(w, (ph.a, pw.a, 0, 0), w.shape, (strides[0], strides[1], 1, 1))
                crop = [(max(0, -lo), max(0, -hi)) for lo, hi in (ph.pad, pw.pad)]
                part = dy
                if any(any(pair) for pair in crop):
                    part = jax.lax.pad(
                        dy,
                        jnp.zeros((), dy.dtype),
                        (
                            (0, 0, 0),
                            (-crop[0][0], -crop[0][1], 0),
                            (-crop[1][0], -crop[1][1], 0),
                            (0, 0, 0),
                        ),
                    )
                pads = tuple((max(0, lo), max(0, hi)) for lo, hi in (ph.pad, pw.pad))
                call = jax.ffi.ffi_call(_CONV_TARGET, jax.ShapeDtypeStruct(shape, dy.dtype))
                z = call(part, sub, flip=np.int64(1), **_attributes((1, 1), pads))
            if strides == (1, 1):
                return z
            z = jnp.pad(z, ((0, 0), (0, rows[0] - ph.count), (0, rows[1] - pw.count), (0, 0)))
            grid[ph.first][pw.first] = z
    stacked = jnp.stack([jnp.stack(row, axis=3) for row in grid], axis=2)  # n, Mh, sh, Mw, sw, c
    dx = stacked.reshape(n, rows[0] * strides[0], rows[1] * strides[1], c)
    return dx[:, : input_shape[0], : input_shape[1]]


def _native_input_grad(ctx, dy, w, **params):
    return mlir.lower_fun(functools.partial(_phase_input_grad, **params), False)(ctx, dy, w)


def _cpu_input_grad(ctx, dy, w, **params):
    return _lower(ctx, _native_input_grad, _reference_input_grad, dy, w, **params)


def _native_kernel_grad(ctx, x, dy, *, strides, padding, kernel_size):
    return jax.ffi.ffi_lowering(_KERNEL_GRAD_TARGET)(ctx, x, dy, **_attributes(strides, padding))


def _cpu_kernel_grad(ctx, x, dy, **params):
    return _lower(ctx, _native_kernel_grad, _reference_kernel_grad, x, dy, **params)


def _batch_rule(primitive, fold_first: bool):
    """vmap: with only the first operand batched (and ``fold_first``), the batch axis is folded
    into the images; otherwise one call per element (``lax.map``)."""

    def rule(args, dims, **params):
        (a, b), (da, db) = args, dims
        if db is None and fold_first:
            a = jnp.moveaxis(a, da, 0)
            out = primitive.bind(a.reshape(-1, *a.shape[2:]), b, **params)
            return out.reshape(a.shape[0], -1, *out.shape[1:]), 0
        if da is None:
            return jax.lax.map(
                lambda b1: primitive.bind(a, b1, **params), jnp.moveaxis(b, db, 0)
            ), 0
        a = jnp.moveaxis(a, da, 0)
        if db is None:
            return jax.lax.map(lambda a1: primitive.bind(a1, b, **params), a), 0
        b = jnp.moveaxis(b, db, 0)
        return jax.lax.map(lambda ab: primitive.bind(*ab, **params), (a, b)), 0

    return rule


class _Primitives(NamedTuple):
    """The three convolution primitives (see above)."""

    conv: jax.extend.core.Primitive
    input_grad: jax.extend.core.Primitive
    kernel_grad: jax.extend.core.Primitive


def _define_primitives() -> _Primitives:
    """Defines and registers the primitives: abstract evaluation, lowerings (XLA's
    everywhere, native on the CPU), transposes and batching rules. Raises whatever a JAX
    release without these JAX-internal APIs raises."""
    if _INTERPRETERS_ERROR is not None:
        raise _INTERPRETERS_ERROR
    conv = _make_primitive("ifjax_conv2d", _reference_conv, _conv_shape)
    input_grad = _make_primitive(
        "ifjax_conv2d_input_grad", _reference_input_grad, _input_grad_shape
    )
    kernel_grad = _make_primitive(
        "ifjax_conv2d_kernel_grad", _reference_kernel_grad, _kernel_grad_shape
    )
    mlir.register_lowering(conv, _cpu_conv, platform="cpu")
    mlir.register_lowering(input_grad, _cpu_input_grad, platform="cpu")
    mlir.register_lowering(kernel_grad, _cpu_kernel_grad, platform="cpu")

    # Transposes: <conv(x, w), dy> = <input_grad(dy, w), x> = <kernel_grad(x, dy), w>.
    ad.defbilinear(
        conv,
        lambda ct, x, w, *, strides, padding: input_grad.bind(
            ct, w, strides=strides, padding=padding, input_shape=tuple(x.aval.shape[1:3])
        ),
        lambda ct, x, w, *, strides, padding: kernel_grad.bind(
            x, ct, strides=strides, padding=padding, kernel_size=tuple(w.aval.shape[:2])
        ),
    )
    ad.defbilinear(
        input_grad,
        lambda ct, dy, w, *, strides, padding, input_shape: conv.bind(
            ct, w, strides=strides, padding=padding
        ),
        lambda ct, dy, w, *, strides, padding, input_shape: kernel_grad.bind(
            ct, dy, strides=strides, padding=padding, kernel_size=tuple(w.aval.shape[:2])
        ),
    )
    ad.defbilinear(
        kernel_grad,
        lambda ct, x, dy, *, strides, padding, kernel_size: input_grad.bind(
            dy, ct, strides=strides, padding=padding, input_shape=tuple(x.aval.shape[1:3])
        ),
        lambda ct, x, dy, *, strides, padding, kernel_size: conv.bind(
            x, ct, strides=strides, padding=padding
        ),
    )
    batching.primitive_batchers[conv] = _batch_rule(conv, fold_first=True)
    batching.primitive_batchers[input_grad] = _batch_rule(input_grad, fold_first=True)
    batching.primitive_batchers[kernel_grad] = _batch_rule(kernel_grad, fold_first=False)
    return _Primitives(conv, input_grad, kernel_grad)


try:  # an incompatible JAX release leaves XLA's convolutions (conv2d_available() is False)
    _PRIMITIVES: _Primitives | None = _define_primitives()
    _PRIMITIVES_ERROR: Exception | None = None
except Exception as _error:  # noqa: BLE001 - whatever this JAX release changed
    _PRIMITIVES, _PRIMITIVES_ERROR = None, _error


def _static(strides, padding) -> tuple[tuple[int, int], Padding]:
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(strides) != 2 or min(strides) < 1 or len(padding) != 2 or min(min(padding)) < 0:
        raise ValueError(
            f"strides {strides} and padding {padding}: 2 positive and 2 pairs of non-negative"
        )
    return strides, padding


def _check_float32(name: str, *arrays) -> None:
    dtypes = [a.dtype for a in arrays]
    if any(d != jnp.float32 for d in dtypes):
        raise TypeError(f"{name}: float32 only, got {', '.join(map(str, dtypes))}")
    if not conv2d_available():
        raise RuntimeError(f"{name}: the native convolution is not available here")


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Padding,
) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))`` for float32, computed by the native kernel, derivatives included.

    Differentiable in both arguments, to any order, in forward and reverse mode: its
    transposes are :func:`conv2d_input_grad` and :func:`conv2d_kernel_grad`, native too.
    Batched by ``vmap``: a batched input with a shared kernel is one call over all images;
    batched kernels one call per element. Call it only where :func:`conv2d_available` is
    true, on the CPU backend (other backends compute XLA's convolution). Every output
    element is one float32 sum over (kh, kw, I) in that order, so results equal XLA's to
    float rounding.

    Args:
      x: (N, H, W, I) float32.
      kernel: (kh, kw, I, O) float32.
      strides: (sh, sw), positive.
      padding: ((top, bottom), (left, right)), non-negative.

    Returns:
      (N, Ho, Wo, O) float32.
    """
    _check_float32("conv2d", x, kernel)
    strides, padding = _static(strides, padding)
    return _PRIMITIVES.conv.bind(x, kernel, strides=strides, padding=padding)


def conv2d_input_grad(
    dy: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Padding,
    input_shape: tuple[int, int],
) -> jax.Array:
    """The gradient of :func:`conv2d` with respect to its input: (N, H, W, I) from dy
    (N, Ho, Wo, O), for an input map ``input_shape`` (H, W).

    For stride 1 it is one native convolution of dy (padded by ``k - 1 - padding``,
    cropped where that is negative) with the kernel rotated by 180 degrees and its
    channel axes swapped. For stride s, input rows ``h`` with the same ``(h + top) mod s``
    form a phase that only the taps ``a, a + s, ...`` reach: one such stride-1 convolution
    per phase (s_h x s_w of them, none for phases without taps), interleaved into dx."""
    _check_float32("conv2d_input_grad", dy, kernel)
    strides, padding = _static(strides, padding)
    shape = tuple(int(s) for s in input_shape)
    return _PRIMITIVES.input_grad.bind(
        dy, kernel, strides=strides, padding=padding, input_shape=shape
    )


def conv2d_kernel_grad(
    x: jax.Array,
    dy: jax.Array,
    strides: tuple[int, int],
    padding: Padding,
    kernel_size: tuple[int, int],
) -> jax.Array:
    """The gradient of :func:`conv2d` with respect to its kernel: (kh, kw, I, O) from the
    input x (N, H, W, I) and dy (N, Ho, Wo, O). Each image range sums into its own copy,
    added in a fixed order, so results are deterministic."""
    _check_float32("conv2d_kernel_grad", x, dy)
    strides, padding = _static(strides, padding)
    size = tuple(int(s) for s in kernel_size)
    return _PRIMITIVES.kernel_grad.bind(x, dy, strides=strides, padding=padding, kernel_size=size)
