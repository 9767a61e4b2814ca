"""Native CPU kernels for what XLA:CPU does slowly, built on first use.

XLA:CPU computes the kernel gradient of a convolution as a convolution whose input is the
activations transposed from (N, H, W, C) to (C, H, W, N). It writes that transpose element by
element, reading one float per cache line: in a ResNet18 training step on a 2-core x86 CPU
these transposes took ~35% of the step. :func:`batch_to_minor` does the same transpose with a
small C++ kernel (``models/_kernels/transpose.cc``: contiguous tile copies and blocked
transposes, 4-10x faster), registered with XLA as an FFI custom call.

The kernel is compiled with the system's C++ compiler (``$CXX``, else ``c++``/``g++``)
against the FFI headers that jaxlib ships (``jax.ffi.include_dir()``), once per source,
jaxlib version and compiler, into ``$IFJAX_CACHE_DIR/kernels`` (default
``~/.cache/ifjax/kernels``; the temporary directory if that cannot be created), written
atomically. Without a compiler, or if the build fails,
or with ``IFJAX_NATIVE=0``, :func:`batch_to_minor` is ``jnp.transpose`` (same results) and a
warning says why once.
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

__all__ = ["NATIVE_VARIABLE", "batch_to_minor", "native_available"]

NATIVE_VARIABLE = "IFJAX_NATIVE"
_SOURCE = Path(__file__).with_name("_kernels") / "transpose.cc"
_TARGET = "ifjax_batch_to_minor"
_SYMBOL = "IfjaxBatchToMinor"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
_lock = threading.Lock()
_registered: list[str] = []  # the library registered with XLA in this process, if any
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
    source = _SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    parts = [source, jaxlib.__version__.encode(), version.encode(), " ".join(_FLAGS).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: build per user in the temporary directory
        directory = Path(tempfile.gettempdir()) / f"ifjax-kernels-{os.getuid()}"
        directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"transpose-{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)  # atomic: concurrent builders each write a whole file
    _log.info("built %s", library)
    return library


@functools.cache
def _load() -> bool:
    """Builds, loads and registers the kernel once per process; False if unavailable."""
    if switched_off(NATIVE_VARIABLE):
        return False
    with _lock:
        if _registered:  # a target is registered once per process
            return True
        try:
            path = _build()
            library = ctypes.cdll.LoadLibrary(str(path))
            capsule = jax.ffi.pycapsule(getattr(library, _SYMBOL))
            jax.ffi.register_ffi_target(_TARGET, capsule, platform="cpu")
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
