"""Helpers shared by the benchmark scripts: machine description, interleaved timing.

The machines these benchmarks run on are shared, so a measurement of ifjax and one of
its baseline taken minutes apart can differ by 2x from load alone. Every script here
therefore measures all its candidates in *rounds*, one measurement of each candidate per
round, and reports medians over rounds and the median of per-round ratios.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

__all__ = [
    "conv_implementation",
    "interleaved",
    "machine",
    "median_ratio",
    "stopwatch",
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """The CPU, its core count, the load average and the versions that matter."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_average_1min": round(load[0], 2),
        "python": platform.python_version(),
        **{p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "ott-jax", "torch")},
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


@contextlib.contextmanager
def conv_implementation(value: str, **environment: str) -> Iterator[None]:
    """Sets ``IFJAX_CONV`` (see ``models/layers.py``), and any other variables given,
    inside the block.

    The values are read when a convolution is traced, so functions must be traced (and
    jitted functions compiled) inside the block; they keep the choice afterwards.
    """
    settings = {"IFJAX_CONV": value, **environment}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, old in before.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def stopwatch(function: Callable[[], Any]) -> float:
    """Seconds ``function()`` takes (it must block until its results are ready)."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(
    candidates: Mapping[str, Callable[[], float]], rounds: int, log: Callable[[str], None] = print
) -> dict[str, list[float]]:
    """Measures every candidate once per round, in turn, ``rounds`` times.

    Args:
      candidates: name -> a function running one measurement and returning its value.
      rounds: number of rounds.
      log: called with one line per round.

    Returns:
      name -> the values of the rounds, in order.
    """
    values: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name, measure in candidates.items():
            values[name].append(measure())
        log(
            f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.3g}" for n, v in values.items())
        )
    return values


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median over rounds of ``numerator[r] / denominator[r]``."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
