"""The numbers reported in the Intra-Fusion paper, read from ``../shared/paper/*.csv``.

The CSVs sit next to the repository (``<repo>/../shared/paper``) or wherever
``$IFJAX_PAPER_DIR`` points. When they are absent every reader returns ``None`` and
callers skip the comparison. Accuracies are top-1 in percent, as the paper reports them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

__all__ = [
    "PAPER_MODELS",
    "paper_dataset",
    "paper_datafree",
    "paper_dir",
]

_REPO_ROOT = Path(__file__).resolve().parents[1]
# (model, dataset) pairs whose data-free tables the paper reports for CIFAR.
PAPER_MODELS = (
    ("vgg11_bn", "cifar10"),
    ("vgg11_bn", "cifar100"),
    ("resnet18", "cifar10"),
    ("resnet18", "cifar100"),
)
# Datasets of this repository that are the paper's datasets under another name.
_DATASET_ALIASES = {"cifar10_jpeg": "cifar10"}

# (group, sparsity, importance) -> (default top-1 %, intra-fusion top-1 %)
DatafreeTable = dict[tuple[int, float, str], tuple[float, float]]


def paper_dir() -> Path | None:
    """Returns the directory of the paper's CSVs, or None when there is none.

    ``$IFJAX_PAPER_DIR`` wins (an empty value disables the comparison); otherwise
    ``<repo root>/../shared/paper``.
    """
    configured = os.environ.get("IFJAX_PAPER_DIR")
    if configured is not None:
        path = Path(configured).expanduser() if configured else None
    else:
        path = _REPO_ROOT.parent / "shared" / "paper"
    return path if path is not None and (path / "datafree.csv").is_file() else None


def paper_dataset(dataset: str) -> str:
    """The paper's name of a dataset (``cifar10_jpeg`` is CIFAR-10)."""
    return _DATASET_ALIASES.get(dataset, dataset)


def paper_datafree(model: str | None, dataset: str | None) -> DatafreeTable | None:
    """The paper's data-free accuracies of one model on one dataset.

    Args:
      model: ``vgg11_bn`` or ``resnet18`` (any width: the paper's numbers are for
        width 1, compare gains rather than accuracies).
      dataset: ``cifar10``, ``cifar10_jpeg`` or ``cifar100``.

    Returns:
      ``{(group, sparsity, importance): (default, intra_fusion)}`` in percent, or None
      when the paper has no such table or its CSVs are not found.

    Example:
      >>> paper_datafree("vgg11_bn", "cifar10")[(0, 0.5, "l1")]
      (87.91, 89.07)
    """
    if model is None or dataset is None:
        return None
    dataset = paper_dataset(dataset)
    directory = paper_dir()
    if (model, dataset) not in PAPER_MODELS or directory is None:
        return None
    table: DatafreeTable = {}
    with open(directory / "datafree.csv", newline="") as file:
        for row in csv.DictReader(file):
            if row["model"] == model and row["dataset"] == dataset:
                key = (int(row["group"]), round(float(row["sparsity"]), 6), row["importance"])
                table[key] = (float(row["default_acc"]), float(row["intra_fusion_acc"]))
    return table or None


# neuron sparsity of all groups -> (base, default, intra_fusion) top-1 %
FinetunedTable = dict[float, tuple[float, float, float]]


def paper_finetuned(model: str | None, dataset: str | None) -> FinetunedTable | None:
    """The paper's Table 1 (all groups pruned, then fine-tuned) for one model and dataset.

    Returns:
      ``{neuron sparsity: (base, default, intra_fusion)}`` in percent, or None when the
      paper has no such rows or its CSVs are not found.

    Example:
      >>> paper_finetuned("vgg11_bn", "cifar10")[0.6]
      (89.56, 88.14, 88.51)
    """
    directory = paper_dir()
    if model is None or dataset is None or directory is None:
        return None
    path = directory / "finetuned.csv"
    if not path.is_file():
        return None
    table: FinetunedTable = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            if row["model"] == model and row["dataset"] == paper_dataset(dataset):
                sparsity = round(float(row["neuron_sparsity_all_groups"]), 6)
                values = (row["base_acc"], row["default_acc"], row["intra_fusion_acc"])
                table[sparsity] = tuple(float(v) for v in values)
    return table or None
