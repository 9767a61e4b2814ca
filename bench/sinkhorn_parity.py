"""How many golden cases the Sinkhorn solver reproduces, per epsilon.

Usage: python bench/sinkhorn_parity.py [epsilon ...]   (default: the library default)

Runs every case of ../shared/golden with ``solver="sinkhorn"`` and counts those whose
logits match the reference to the parity tolerance (rtol 1e-4, atol 1e-5), and reports
the largest logit error of the Intra-Fusion cases.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import ifjax
from tests.golden import NAMES, setup


def count(epsilon: float) -> tuple[int, int, float, int]:
    matched = total = not_converged = 0
    worst = 0.0
    for name in NAMES:
        golden, groups, folded = setup(name)
        for case in golden.cases:
            importance = "lamp_released" if case["importance"] == "lamp" else case["importance"]
            if case["method"] == "default":
                pruner = ifjax.default_pruning(case["sparsity"], importance)
            else:
                pruner = ifjax.intra_fusion(
                    case["sparsity"],
                    importance,
                    marginals=case["marginals"],
                    solver="sinkhorn",
                    epsilon=epsilon,
                )
            group = groups[case["group"]]
            plan = pruner.plan(folded, group)
            not_converged += not bool(plan.converged)
            variables = pruner.apply(folded, group, plan)
            logits = np.asarray(golden.model.for_variables(variables).apply(variables, golden.x))
            reference = golden.arrays[f"{case['id']}/logits"]
            ok = np.allclose(logits, reference, rtol=1e-4, atol=1e-5)
            matched += ok
            total += 1
            if case["method"] != "default":
                worst = max(worst, float(np.abs(logits - reference).max()))
    return matched, total, worst, not_converged


def main() -> None:
    epsilons = [float(e) for e in sys.argv[1:]] or [ifjax.SinkhornSolver().epsilon]
    print("| epsilon (relative) | cases matched | worst IF logit error | not converged | s |")
    print("|---|---|---|---|---|")
    for epsilon in epsilons:
        start = time.perf_counter()
        matched, total, worst, nc = count(epsilon)
        took = time.perf_counter() - start
        print(f"| {epsilon:g} | {matched}/{total} | {worst:.2e} | {nc} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
