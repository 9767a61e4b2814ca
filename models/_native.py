"""Native CPU kernels for what XLA:CPU does slowly, built on first use.

Two kernels, each registered with XLA as an FFI custom call:

* :func:`batch_to_minor`, a transpose (``models/_kernels/transpose.cc``);
* :func:`conv2d`, a direct float32 convolution for CPUs with AVX-512
  (``models/_kernels/conv.cc``): a block of 6 output pixels x 64 output channels held in
  vector registers, 1.2-2x faster than XLA:CPU's convolution on ResNet18's 3x3 layers
  (``bench/README.md``). It runs on XLA's intra-op thread pool.

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

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NATIVE_CONV_VARIABLE",
    "NATIVE_VARIABLE",
    "batch_to_minor",
    "conv2d",
    "conv2d_available",
    "native_available",
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
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
_lock = threading.Lock()
_registered: list[str] = []  # the library registered with XLA in this process, if any
_conv_supported: list[bool] = []  # whether this CPU runs the convolution kernel (AVX-512)
_log = logging.getLogger(__name__)


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
            for target, symbol in ((_TARGET, _SYMBOL), (_CONV_TARGET, _CONV_SYMBOL)):
                capsule = jax.ffi.pycapsule(getattr(library, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
            _conv_supported.append(bool(getattr(library, _CONV_SUPPORTED)()))
            _registered.append(str(path))
        except Exception as error:  # noqa: BLE001 - any failure means: use the XLA transpose
            warnings.warn(
                f"ifjax: native CPU kernel unavailable ({error}); using XLA's transpose "
                f"(slower kernel gradients on CPU; set {NATIVE_VARIABLE}=0 to silence)",
                RuntimeWarning,
                stacklevel=3,
            )
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
    return bool(_conv_supported and _conv_supported[0])


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))`` for float32, computed by the native kernel.

    Forward only (no derivative rule; :mod:`models.layers` supplies the gradients). Call it
    only where :func:`conv2d_available` is true, on the CPU backend. Every output element
    is one float32 sum over (kh, kw, I) in that order, so results equal XLA's to float
    rounding. Batched by ``vmap`` one call per element.

    Args:
      x: (N, H, W, I) float32.
      kernel: (kh, kw, I, O) float32.
      strides: (sh, sw), positive.
      padding: ((top, bottom), (left, right)), non-negative.

    Returns:
      (N, Ho, Wo, O) float32.
    """
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"conv2d: float32 only, got {x.dtype} and {kernel.dtype}")
    if not conv2d_available():
        raise RuntimeError("conv2d: the native convolution is not available here")
    (sh, sw), ((top, bottom), (left, right)) = strides, padding
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    out = ((h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1)
    call = jax.ffi.ffi_call(
        _CONV_TARGET, jax.ShapeDtypeStruct((n, *out, o), x.dtype), vmap_method="sequential"
    )
    attrs = dict(sh=sh, sw=sw, top=top, bottom=bottom, left=left, right=right)
    return call(x, kernel, **{k: np.int64(v) for k, v in attrs.items()})
