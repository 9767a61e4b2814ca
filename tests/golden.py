"""Loading the reference implementation's parity vectors (../shared/golden)."""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

import ifjax
from models import VGG, resnet18
from models.torch_weights import load_torch_state_dict, torch_module_names

GOLDEN = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"

_MODELS = {
    "vgg11_tiny": lambda: VGG(cfg=(8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M")),
    "resnet18_tiny": lambda: resnet18(widths=(8, 16, 32, 64)),
}

_LEAF = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "bn": {
        "weight": ("params", "scale"),
        "bias": ("params", "bias"),
        "running_mean": ("batch_stats", "mean"),
        "running_var": ("batch_stats", "var"),
    },
}


class Golden:
    """One golden model: its Flax model and variables, input, and cases."""

    def __init__(self, name: str):
        self.name = name
        self.meta = json.loads((GOLDEN / f"{name}.json").read_text())
        self.arrays = np.load(GOLDEN / f"{name}.npz")
        state = {k[5:]: self.arrays[k] for k in self.arrays.files if k.startswith("base/")}
        self.model, self.variables = load_torch_state_dict(_MODELS[name](), state)
        self.x = self.arrays["input_nchw"].transpose(0, 2, 3, 1)
        self.cases = self.meta["cases"]
        modules = torch_module_names(self.model)
        self.torch_to_flax = {t: (path, kind) for path, (t, kind) in modules.items()}

    def flax_leaf(self, torch_param: str) -> tuple[tuple[str, ...], str]:
        """("params", "conv7", "kernel"), kind for "features.25.weight"."""
        module, leaf = torch_param.rsplit(".", 1)
        path, kind = self.torch_to_flax[module]
        collection, name = _LEAF[kind][leaf]
        return (collection, *path.split("/"), name), kind

    @staticmethod
    def to_torch_layout(value: np.ndarray, kind: str, leaf: str) -> np.ndarray:
        if leaf == "weight" and kind == "conv":
            return np.asarray(value).transpose(3, 2, 0, 1)
        if leaf == "weight" and kind == "dense":
            return np.asarray(value).T
        return np.asarray(value)


def available() -> bool:
    return (GOLDEN / "vgg11_tiny.npz").exists()


NAMES = ("vgg11_tiny", "resnet18_tiny")


@functools.cache
def setup(name: str):
    golden = Golden(name)
    groups = ifjax.discover_groups(golden.model, golden.variables, golden.x)
    folded = ifjax.fold_batchnorm(golden.variables, groups)
    return golden, groups, folded


def pruner_for(case, solver="exact"):
    # the golden "lamp" is the released code's scrambled LAMP
    importance = "lamp_released" if case["importance"] == "lamp" else case["importance"]
    if case["method"] == "default":
        return ifjax.default_pruning(case["sparsity"], importance)
    return ifjax.intra_fusion(
        case["sparsity"], importance, marginals=case["marginals"], solver=solver
    )


def cases():
    if not available():
        return []
    return [(name, case["id"]) for name in NAMES for case in Golden(name).cases]


def prune_case(name: str, case_id: str, solver: str = "exact"):
    golden, groups, folded = setup(name)
    case = next(c for c in golden.cases if c["id"] == case_id)
    group = groups[case["group"]]
    pruner = pruner_for(case, solver)
    plan = pruner.plan(folded, group)
    variables = pruner.apply(folded, group, plan)
    # eager: every case has its own shapes, and compiling the whole forward per case costs
    # more than running its operations one by one (most are cached across cases)
    logits = golden.model.for_variables(variables).apply(variables, golden.x)
    return golden, case, variables, np.asarray(logits), plan
