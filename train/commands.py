"""The options of the ``ifjax`` commands that run a job of :mod:`train.jobs`, one
dataclass per command (see :mod:`train.options`); the split-data commands' options are
those of :mod:`train.pipelines`.

A command's fields are the keyword arguments of its job, so ``job(**options.arguments())``
runs it; scripts (``reports/``) build the same dataclasses.

Example:
  >>> options = PruneOptions(checkpoint="runs/vgg/model", out="runs/vgg50", sparsity=0.5)
  >>> jobs.prune_checkpoint(**options.arguments())
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import ifjax
from models.registry import MODEL_FACTORIES
from train import jobs, sweep
from train.options import (
    FRACTION,
    NONNEGATIVE_FLOAT,
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SPARSITY,
    Options,
    option,
)
from train.training import OPTIMIZERS, SCHEDULES

__all__ = [
    "DATASETS",
    "METHODS",
    "MODELS",
    "DatafreeOptions",
    "DemoOptions",
    "EvalOptions",
    "FinetuneOptions",
    "PruneOptions",
    "TrainOptions",
    "parse_groups",
]

MODELS = tuple(MODEL_FACTORIES)  # every model of models.registry
DATASETS = ("cifar10", "cifar10_jpeg", "cifar100", "imagenet2012")
METHODS = ("intra_fusion", "default")
SOLVERS = ("exact", "sinkhorn")
_DATA_DIR_HELP = "tfds data dir (default $IFJAX_DATA_DIR, ...)"
_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def parse_groups(text: str) -> str | tuple[int, ...]:
    """``"all"``, a group kind (``"heads"``, ...) or comma-separated indices (``"0,3"``)."""
    if text == "all" or text in ifjax.GROUP_KINDS:
        return text
    message = f"groups must be 'all', a kind ({', '.join(ifjax.GROUP_KINDS)}) or indices like 0,3"
    try:
        indices = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{message}, got {text!r}") from None
    if not indices or min(indices) < 0:
        raise argparse.ArgumentTypeError(f"{message}, got {text!r}")
    return indices


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Job(Options):
    """A job's options: every field is a keyword argument of the job (:meth:`arguments`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Data(_Job):
    """Where the data comes from (the dataset defaults to the checkpoint's)."""

    dataset: str | None = option(None, choices=DATASETS, help="dataset (default: the checkpoint's)")
    data_dir: str | None = option(None, help=_DATA_DIR_HELP)
    zip_path: str | None = option(None, help="the offline CIFAR-10 JPEG zip (found automatically)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Fit(_Data):
    """Training (from scratch or fine-tuning) into a resumable workdir."""

    workdir: str = option(help="checkpoints, metrics and workdir/model")
    epochs: int = option(300, check=POSITIVE_INT)
    batch_size: int = option(128, check=POSITIVE_INT)
    schedule: str = option("base", choices=SCHEDULES)
    seed: int = option(0)
    train_subset: int | None = option(
        None, check=POSITIVE_INT, help="random subset of training images"
    )
    max_steps: int | None = option(
        None, check=POSITIVE_INT, help="stop (resumably) after this step"
    )
    checkpoint_every: int | None = option(
        None, check=POSITIVE_INT, help="also checkpoint every N steps"
    )
    optimizer: str = option("sgd", choices=OPTIMIZERS, help="default sgd")
    peak_lr: float | None = option(
        None, flag="--lr", check=POSITIVE_FLOAT, help="peak learning rate (default: schedule's)"
    )
    weight_decay: float | None = option(None, check=NONNEGATIVE_FLOAT, help="default 5e-4")
    label_smoothing: float = option(
        0.0, check=FRACTION, help="smooth the training loss's targets by this (default 0)"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOptions(_Fit):
    """``ifjax train``: :func:`train.jobs.train`."""

    model: str = option(choices=MODELS)
    width_multiplier: float = option(1.0, check=POSITIVE_FLOAT)
    dataset: str = option("cifar10", choices=DATASETS, help="dataset")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneOptions(_Fit):
    """``ifjax finetune``: :func:`train.jobs.finetune`."""

    checkpoint: str = option()
    epochs: int = option(10, check=POSITIVE_INT)
    schedule: str = option("finetune", choices=SCHEDULES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions(_Data):
    """``ifjax eval``: :func:`train.jobs.evaluate_checkpoint`."""

    checkpoint: str = option()
    test_subset: int | None = option(None, check=POSITIVE_INT, help="random subset of test images")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Pruning(_Data):
    """What the pruning commands share: the checkpoint, the groups, the solver, the seed
    and BatchNorm recalibration."""

    checkpoint: str = option()
    out: str = option()
    groups: str | tuple[int, ...] = option(
        "all",
        parse=parse_groups,
        help="'all' (not a residual stream), a kind (heads, neurons, ...) or indices, e.g. 0,3",
    )
    solver: str = option("exact", choices=SOLVERS)
    epsilon: float = option(1e-3, check=POSITIVE_FLOAT, help="Sinkhorn (relative)")
    recalibrate: int = option(
        0,
        check=NONNEGATIVE_INT,
        metavar="N",
        help="re-estimate BatchNorm statistics on N training images after pruning (0: no)",
    )
    seed: int = option(0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneOptions(_Pruning):
    """``ifjax prune``: :func:`train.jobs.prune_checkpoint`."""

    INTRA_FUSION = ("marginals", "target", "solver", "epsilon", "map_normalization")

    out: str = option(help="where the pruned checkpoint goes")
    sparsity: float = option(check=SPARSITY)
    method: str = option("intra_fusion", choices=METHODS)
    importance: str = option("l1", choices=ifjax.IMPORTANCES)
    marginals: str = option("uniform", choices=("uniform", "importance"))
    target: str = option("most_important", choices=("most_important", "centroids"))
    map_normalization: str = option("reference", choices=("reference", "row_average"))
    round_to: int = option(
        1,
        check=POSITIVE_INT,
        help="keep a multiple of this many channels per group (e.g. 8 for accelerators)",
    )
    evaluate: bool = option(False, help="print top-1 before and after")
    seed: int = option(0, help="key of 'random' importance")
    overwrite: bool = option(False, help="replace an existing --out")

    def arguments(self) -> dict[str, Any]:
        """The job's keyword arguments, Intra-Fusion's settings in ``options``."""
        arguments = super().arguments()
        options = {name: arguments.pop(name) for name in self.INTRA_FUSION}
        return arguments | {"options": options}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatafreeOptions(_Pruning):
    """``ifjax datafree``: :func:`train.jobs.datafree`."""

    out: str = option(help="directory for the CSV, markdown and plots")
    groups: str | tuple[int, ...] = option("all", parse=parse_groups)
    sparsities: tuple[float, ...] = option(_SPARSITIES, check=SPARSITY)
    importances: tuple[str, ...] = option(("l1", "lamp", "taylor"), choices=ifjax.IMPORTANCES)
    methods: tuple[str, ...] = option(
        ("default", "intra_fusion"),
        choices=tuple(sweep.METHOD_VARIANTS),
        help="comma-separated: default, intra_fusion (with --solver), intra_fusion_sinkhorn, "
        "intra_fusion_row_average",
    )
    paper_lamp: bool | None = option(
        None,
        help="score 'lamp' with the released code's LAMP (lamp_released), as the paper's "
        "numbers were; default: on when the paper's numbers are there to compare with",
    )
    test_subset: int | None = option(None, check=POSITIVE_INT, help="random subset of test images")
    recalibrate: int = option(
        0,
        check=NONNEGATIVE_INT,
        metavar="N",
        help="re-estimate BatchNorm statistics of every pruned model on N training images "
        "before evaluating it (0: no, the paper's data-free setting)",
    )
    resume: bool = option(
        True, flag="--restart", help="ignore the cells finished in --out/datafree.jsonl"
    )


def _demo_default(name: str) -> str:
    return f"default {jobs.DEMO[name]}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions(_Job):
    """``ifjax demo``: :func:`train.jobs.demo`; None keeps :data:`train.jobs.DEMO`'s."""

    workdir: str = option("runs/demo", help="default runs/demo")
    width_multiplier: float | None = option(
        None, check=POSITIVE_FLOAT, help=_demo_default("width_multiplier")
    )
    epochs: int | None = option(None, check=POSITIVE_INT, help=_demo_default("epochs"))
    train_subset: int | None = option(None, check=POSITIVE_INT, help="default: all training images")
    test_subset: int | None = option(None, check=POSITIVE_INT, help="default: all test images")
    sparsities: tuple[float, ...] | None = option(
        None, check=SPARSITY, help=_demo_default("sparsities")
    )
    importances: tuple[str, ...] | None = option(
        None, choices=ifjax.IMPORTANCES, help=_demo_default("importances")
    )
    data_dir: str | None = option(None)
    zip_path: str | None = option(None)

    def arguments(self) -> dict[str, Any]:
        """``workdir``, ``data_dir``, ``zip_path`` and the settings that override DEMO's."""
        arguments = super().arguments()
        return {k: v for k, v in arguments.items() if v is not None}
