"""Pruning wall time of VGG11-BN (full width): one group, and all groups at 3 sparsities.

Usage::

    python bench/pruning.py                              # sparsities 0.3 0.5 0.7
    python bench/pruning.py --sparsities 0.5 --group 3 --epsilon 0.001

Times, with compilation included (first calls, after ``jax.clear_caches()``) and again
when repeated (the jit caches warm: what a sweep pays per cell), for Default pruning and
Intra-Fusion with the exact (POT network simplex) and the Sinkhorn (ott-jax) solver:

* ``discover``/``fold``: ``ifjax.discover_groups`` and ``ifjax.fold_batchnorm``;
* ``one group``: ``pruner.plan`` + ``pruner.apply`` of one group at the first sparsity;
* ``all groups, prune``: ``ifjax.prune(model, variables, groups, sparsity=s)`` for each
  sparsity, every group pruned in turn on the result of the previous ones;
* ``all groups, plan_groups``: ``pruner.plan_groups`` of every group of the folded dense
  model (same-sized transport problems solved together), then ``pruner.apply`` of each
  plan on its own (masked), as the data-free sweep prunes one group at a time.

Each row also counts the XLA compilations it triggered and the seconds they took
(``jax.monitoring`` events: tracing, lowering and backend compilation), so a repeated
row with compilations means something recompiles. The weights are random (the timings
do not depend on them), BatchNorm statistics randomised so folding does real work.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ifjax  # noqa: E402
from bench.common import machine  # noqa: E402
from models import vgg11_bn  # noqa: E402

__all__ = ["CompileCounter", "main"]

METHODS = (("default", None), ("intra_fusion", "exact"), ("intra_fusion", "sinkhorn"))


class CompileCounter:
    """Counts JAX compilations and sums their seconds, from ``jax.monitoring`` events."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration
            self.count += event.endswith("backend_compile_duration")

    def measure(self, function: Callable[[], Any]) -> dict[str, float]:
        """Runs ``function`` (it must block), returning seconds and compilations."""
        count, seconds = self.count, self.seconds
        start = time.perf_counter()
        function()
        return {
            "seconds": time.perf_counter() - start,
            "compilations": self.count - count,
            "compile_seconds": self.seconds - seconds,
        }


def _random_variables(model, x: jnp.ndarray) -> dict[str, Any]:
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)

    def randomize(path, leaf):
        name = str(path[-1].key)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        if name == "mean":
            return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(randomize, variables)


def _pruner(method: str, solver: str | None, sparsity: float, epsilon: float) -> ifjax.Pruner:
    if method == "default":
        return ifjax.default_pruning(sparsity, "l1")
    return ifjax.intra_fusion(sparsity, "l1", solver=solver, epsilon=epsilon)


def _ready(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def _scenarios(model, variables, folded, groups, args) -> dict[str, Callable[[str, Any], Any]]:
    """name -> run(method, solver) for the three pruning scenarios."""
    sparsities: Sequence[float] = args.sparsities
    group = groups[args.group]

    def one_group(method, solver):
        pruner = _pruner(method, solver, sparsities[0], args.epsilon)
        _ready(pruner.apply(folded, group, pruner.plan(folded, group)))

    def prune_all(method, solver):
        options = {} if method == "default" else {"solver": solver, "epsilon": args.epsilon}
        for s in sparsities:
            _ready(ifjax.prune(model, variables, groups, sparsity=s, method=method, **options)[1])

    def plan_groups(method, solver):
        for s in sparsities:
            pruner = _pruner(method, solver, s, args.epsilon)
            plans = pruner.plan_groups(folded, groups)
            for g, plan in zip(groups, plans, strict=True):
                _ready(pruner.apply(folded, g, plan, masked=True))

    return {
        f"one group ({args.group}, n={group.size}), s={sparsities[0]}": one_group,
        f"all {len(groups)} groups x {len(sparsities)} sparsities, prune": prune_all,
        f"all {len(groups)} groups x {len(sparsities)} sparsities, plan_groups": plan_groups,
    }


def _row(scenario: str, method: str, solver: str | None, first, repeat) -> dict[str, Any]:
    label = method if solver is None else f"{method} ({solver})"
    return {"scenario": scenario, "method": label, "first": first, "repeat": repeat}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | method | first call s | compilations (s) | repeated s | recompilations |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        first, repeat = r["first"], r["repeat"]
        lines.append(
            f"| {r['scenario']} | {r['method']} | {first['seconds']:.2f} | "
            f"{first['compilations']} ({first['compile_seconds']:.1f}) | "
            f"{repeat['seconds']:.2f} | {repeat['compilations']} |"
        )
    return "\n".join(lines)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--group", type=int, default=3, help="group of the one-group rows")
    parser.add_argument("--epsilon", type=float, default=1e-3, help="Sinkhorn epsilon")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    """Runs the benchmark described in the module docstring and prints a table."""
    args = _parse()
    counter = CompileCounter()
    print(json.dumps(machine()))
    model = vgg11_bn()
    x = jnp.zeros((1, 32, 32, 3))
    variables = _random_variables(model, x)
    discover = lambda: ifjax.discover_groups(model, variables, x)
    rows = [_row("discover_groups", "-", None, counter.measure(discover), {})]
    groups = discover()
    rows[-1]["repeat"] = counter.measure(discover)
    fold = lambda: _ready(ifjax.fold_batchnorm(variables, groups))
    rows.append(_row("fold_batchnorm", "-", None, counter.measure(fold), counter.measure(fold)))
    folded = fold()
    print(f"{len(groups)} groups, sizes {[g.size for g in groups]}")
    for scenario, run in _scenarios(model, variables, folded, groups, args).items():
        for method, solver in METHODS:
            jax.clear_caches()  # each first call pays its own compilations
            first = counter.measure(functools.partial(run, method, solver))
            repeat = counter.measure(functools.partial(run, method, solver))
            rows.append(_row(scenario, method, solver, first, repeat))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
