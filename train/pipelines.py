"""Split-data pipelines of the paper (section 6): split training, FaP, PaF, and a baseline.

* :func:`split_train`: k replicas, each on its own disjoint split of the training set
  (or the k-fold variant's C(k, k/2) training sets), trained at once (vmapped, sharded
  over the available devices; see :mod:`train.split`).
* :func:`fap` (Fuse-and-Prune): split training -> OTFusion (:func:`ifjax.fuse`) ->
  fine-tune on all data -> iterative Intra-Fusion pruning -> fine-tune.
* :func:`paf` (Prune-and-Fuse): split training -> iterative Intra-Fusion pruning of
  every replica (fine-tuned on all data, vmapped) -> OTFusion -> fine-tune.
* The whole-data baseline (``baseline=True``): one model trained on all data for the
  same epochs, pruned with the same schedule, then fine-tuned ``baseline_finetune_epochs``
  (the paper: twice the pipelines' 80).

Iterative pruning: every group goes from n to ``int(n * (1 - sparsity))`` channels in
``prune_steps`` steps, step i keeping ``int(n * (1 - sparsity * i / prune_steps))``
(Intra-Fusion, BatchNorm folded, as :func:`ifjax.prune`), each followed by
``epochs_per_step`` fine-tuning epochs.

Every stage is timed (wall clock, compilation included, evaluation excluded) and
evaluated on the test set; the report (``report.json``, ``report.csv``, ``report.md`` in
``workdir``) lists accuracy and seconds per stage next to the baseline's, with the
model-training speedup (baseline training / split training) and the overall speedup
(baseline total / pipeline total). Final variables are saved with
:func:`ifjax.checkpoint.save_model`. Stages are not resumable: a rerun starts over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import ifjax
from ifjax._fusion import fuse
from ifjax.checkpoint import save_model
from models.registry import create_model, init_variables, model_spec
from train.data import Dataset, batches, load_dataset
from train.split import (
    IndexedDataset,
    evaluate_replicas,
    kfold_training_sets,
    replica_mesh,
    replica_seed,
    split_indices,
    stack_trees,
    train_replicas,
)

__all__ = [
    "REPORT_COLUMNS",
    "PipelineResult",
    "fap",
    "paf",
    "prune_schedule",
    "prune_to_widths",
    "split_train",
]

REPORT_COLUMNS = (
    "pipeline",
    "stage",
    "models",
    "top1",
    "top1_each",
    "params",
    "seconds",
    "cumulative_seconds",
)


@dataclasses.dataclass
class PipelineResult:
    """What a pipeline produced.

    Attributes:
      report: JSON-serialisable: ``config``, ``rows`` (one per stage, ``REPORT_COLUMNS``)
        and ``summary``.
      model: the final model (pruned widths).
      variables: its final variables (a list, one per replica, for :func:`split_train`).
    """

    report: dict[str, Any]
    model: nn.Module
    variables: Any


@dataclasses.dataclass
class _Context:
    """The data, the training settings and the rows recorded so far."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    batch_size: int
    seed: int
    augment: bool
    num_devices: int | None
    steps_per_epoch: int | None
    log: Callable[[str], None] | None
    fair_timing: bool
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    initials: dict[tuple[Any, int], Any] = dataclasses.field(default_factory=dict)

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def fit(self, model, variables_list, datasets, epochs: int, kind: str, salt: int):
        """Trains the models (vmapped) on their datasets; a no-op for 0 epochs."""
        if epochs <= 0:
            return list(variables_list)
        trained, _ = train_replicas(
            model,
            variables_list,
            datasets,
            epochs=epochs,
            batch_size=self.batch_size,
            optimizer_kind=kind,
            seed=replica_seed(self.seed, 10_000 + salt),
            augment=self.augment,
            num_devices=self.num_devices,
            steps_per_epoch=self.steps_per_epoch,
            log=self.log,
        )
        return trained

    def evaluate(self, model, variables_list) -> list[float]:
        mesh = replica_mesh(len(variables_list), self.num_devices)
        stacked = stack_trees(variables_list)
        test = batches(self.test, 256, shuffle=False, augment=False)
        return [s["top1"] for s in evaluate_replicas(model, stacked, test, mesh)]

    def initial(self, model, count: int) -> list[dict[str, Any]]:
        """Initial variables of replica 0..count-1 (the baseline starts from replica 0's)."""
        for r in range(count):
            if (model, r) not in self.initials:
                seed = replica_seed(self.seed, r)
                self.initials[model, r] = init_variables(model, seed, self.input_shape)
        return [self.initials[model, r] for r in range(count)]

    def fresh_start(self) -> None:
        """With ``fair_timing``, forgets compiled programs so a pipeline compiles its own."""
        if self.fair_timing:
            jax.clear_caches()

    def stage(self, pipeline: str, name: str, run: Callable[[], tuple[Any, list]]):
        """Runs a stage ``() -> (model, variables_list)``, times it, evaluates, records."""
        self.say(f"[{pipeline}] {name} ...")
        start = time.perf_counter()
        model, variables_list = run()
        jax.block_until_ready(variables_list)
        seconds = time.perf_counter() - start
        top1 = self.evaluate(model, variables_list)
        before = sum(r["seconds"] for r in self.rows if r["pipeline"] == pipeline)
        row = {
            "pipeline": pipeline,
            "stage": name,
            "models": len(variables_list),
            "top1": float(np.mean(top1)),
            "top1_each": top1,
            "params": _count_params(variables_list[0]),
            "seconds": seconds,
            "cumulative_seconds": before + seconds,
        }
        self.rows.append(row)
        self.say(f"[{pipeline}] {name}: top1 {row['top1']:.4f} {top1} in {seconds:.1f}s")
        return model, variables_list


def _count_params(variables) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))


# ----------------------------------------------------------------------------- pruning


def prune_schedule(widths: dict[int, int], sparsity: float, steps: int) -> list[dict[int, int]]:
    """Channels to keep per group after each of ``steps`` pruning steps.

    Args:
      widths: ``{group index: n}`` of the unpruned model.
      sparsity: final fraction of each group's channels removed.
      steps: number of pruning steps.

    Returns:
      One ``{group index: m}`` per step, ``m = int(n * (1 - sparsity * i / steps))``;
      the last is ``ifjax.keep_count(n, sparsity)``.

    Example:
      >>> prune_schedule({0: 64}, 0.5, 4)
      [{0: 56}, {0: 48}, {0: 40}, {0: 32}]
    """
    if steps < 1:
        raise ValueError(f"prune_steps must be >= 1, got {steps}")
    final = {g: ifjax.keep_count(n, sparsity) for g, n in widths.items()}
    schedule = [
        {g: max(final[g], int(n * (1 - sparsity * i / steps))) for g, n in widths.items()}
        for i in range(1, steps)
    ]
    return schedule + [final]


def prune_to_widths(
    model: nn.Module,
    variables: Any,
    targets: dict[int, int],
    *,
    example_input: Any,
    importance: str = "l1",
    method: str = "intra_fusion",
) -> tuple[nn.Module, dict[str, Any]]:
    """Prunes every group to the given channel count (Intra-Fusion by default).

    Every BatchNorm is folded first (as :func:`ifjax.prune` does for all groups); then
    each group, from group 0 on, is pruned with :func:`ifjax.prune` at the sparsity that
    keeps exactly ``targets[group.index]`` channels (groups that narrow are left alone).

    Args:
      model: the Linen model (with ``for_variables``).
      variables: its variables.
      targets: ``{group index: channels to keep}``.
      example_input: an input batch, to discover the groups.
      importance: importance metric (see :func:`ifjax.group_importance`).
      method: ``"intra_fusion"`` or ``"default"``.

    Returns:
      ``(pruned_model, pruned_variables)``.
    """
    groups = ifjax.discover_groups(model, variables, example_input)
    variables = ifjax.fold_batchnorm(variables, groups)  # all of them first, as ifjax.prune
    for group in groups:
        target = targets[group.index]
        if target >= group.size:
            continue
        sparsity = 1.0 - (target + 0.5) / group.size  # int(n * (1 - s)) == target
        model, variables, _ = ifjax.prune(
            model,
            variables,
            group,
            sparsity=sparsity,
            method=method,
            importance=importance,
            fold=False,
        )
    return model, variables


def _widths(model, variables, example_input) -> dict[int, int]:
    return {g.index: g.size for g in ifjax.discover_groups(model, variables, example_input)}


def _iterative_prune(ctx: _Context, pipeline: str, model, variables_list, options: dict):
    """``prune_steps`` x (prune every model, fine-tune each on all data) stages."""
    example = np.zeros(ctx.input_shape, np.float32)
    schedule = prune_schedule(
        _widths(model, variables_list[0], example), options["sparsity"], options["prune_steps"]
    )
    for step, targets in enumerate(schedule, start=1):

        def run(model=model, variables_list=variables_list, targets=targets, step=step):
            pruned = [
                prune_to_widths(
                    model, v, targets, example_input=example, importance=options["importance"]
                )
                for v in variables_list
            ]
            model = pruned[0][0]
            tuned = ctx.fit(
                model,
                [v for _, v in pruned],
                [ctx.train] * len(pruned),
                options["epochs_per_step"],
                options["finetune_kind"],
                salt=100 + step,
            )
            return model, tuned

        model, variables_list = ctx.stage(pipeline, f"prune_step_{step}", run)
    return model, variables_list


# ----------------------------------------------------------------------------- stages


def _split_stage(ctx: _Context, pipeline: str, model, k: int, kfold: bool, epochs: int, kind: str):
    index_sets = (kfold_training_sets if kfold else split_indices)(len(ctx.train), k, ctx.seed)
    datasets = [IndexedDataset(ctx.train, indices) for indices in index_sets]
    initial = ctx.initial(model, len(datasets))
    ctx.fresh_start()
    run = lambda: (model, ctx.fit(model, initial, datasets, epochs, kind, salt=1))
    return ctx.stage(pipeline, "split_train", run)


def _fuse_stage(ctx: _Context, pipeline: str, model, variables_list, options: dict):
    samples = min(options["fusion_samples"], len(ctx.train))
    # a random sample: datasets may be stored class by class (cifar10_jpeg is)
    sample = batches(ctx.train, samples, shuffle=True, augment=False, seed=ctx.seed, num_threads=0)
    images = next(iter(sample))["image"]

    def run():
        fused = fuse(
            model,
            variables_list,
            inputs=images,
            num_samples=samples,
            method=options["fusion_method"],
            solver=options["fusion_solver"],
        )
        return model, [fused]

    return ctx.stage(pipeline, "fuse", run)


def _finetune_stage(ctx: _Context, pipeline, name, model, variables_list, epochs, kind, salt):
    run = lambda: (model, ctx.fit(model, variables_list, [ctx.train], epochs, kind, salt))
    return ctx.stage(pipeline, name, run)


def _baseline(ctx: _Context, model, options: dict):
    """The whole-data model: train, prune iteratively, fine-tune."""
    initial = ctx.initial(model, 1)
    ctx.fresh_start()
    run = lambda: (
        model,
        ctx.fit(model, initial, [ctx.train], options["epochs"], options["optimizer_kind"], salt=2),
    )
    model, variables = ctx.stage("baseline", "train", run)
    model, variables = _iterative_prune(ctx, "baseline", model, variables, options)
    epochs = options["baseline_finetune_epochs"]
    return _finetune_stage(
        ctx, "baseline", "finetune", model, variables, epochs, options["finetune_kind"], 3
    )


# ----------------------------------------------------------------------------- reports


def _summary(rows: list[dict[str, Any]], pipeline: str) -> dict[str, Any]:
    mine = [r for r in rows if r["pipeline"] == pipeline]
    base = [r for r in rows if r["pipeline"] == "baseline"]
    summary = {
        "top1": mine[-1]["top1"],
        "seconds": sum(r["seconds"] for r in mine),
        "training_seconds": mine[0]["seconds"],
    }
    if base:
        summary["baseline_top1"] = base[-1]["top1"]
        summary["baseline_seconds"] = sum(r["seconds"] for r in base)
        summary["baseline_training_seconds"] = base[0]["seconds"]
        summary["training_speedup"] = base[0]["seconds"] / max(mine[0]["seconds"], 1e-9)
        summary["overall_speedup"] = summary["baseline_seconds"] / max(summary["seconds"], 1e-9)
    return summary


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['pipeline']}",
        "",
        "| pipeline | stage | models | top-1 | params | seconds | cumulative |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['pipeline']} | {r['stage']} | {r['models']} | {100 * r['top1']:.2f} | "
            f"{r['params']} | {r['seconds']:.1f} | {r['cumulative_seconds']:.1f} |"
        )
    lines += ["", "| summary | value |", "|---|---:|"]
    lines += [
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in report["summary"].items()
    ]
    return "\n".join(lines) + "\n"


def _write_report(workdir: Path, report: dict[str, Any]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    cell = lambda v: json.dumps(v) if isinstance(v, list) else str(v)
    csv = [",".join(REPORT_COLUMNS)]
    csv += [
        ",".join(f'"{cell(r[c])}"' if c == "top1_each" else cell(r[c]) for c in REPORT_COLUMNS)
        for r in report["rows"]
    ]
    (workdir / "report.csv").write_text("\n".join(csv) + "\n")
    (workdir / "report.md").write_text(_markdown(report))


def _finish(ctx, pipeline, config, model, variables_list, workdir) -> PipelineResult:
    report = {
        "pipeline": pipeline,
        "config": config,
        "rows": ctx.rows,
        "summary": _summary(ctx.rows, pipeline),
    }
    if workdir is not None:
        workdir = Path(workdir)
        _write_report(workdir, report)
        names = ["model"] if len(variables_list) == 1 else [f"replica_{r}" for r in range(99)]
        metadata = {"pipeline": pipeline, "config": config}
        for name, variables in zip(names, variables_list, strict=False):
            spec = model_spec(model)
            save_model(
                workdir / name, variables, model_spec=spec, metadata=metadata, overwrite=True
            )
    ctx.say(_markdown(report))
    variables = variables_list[0] if len(variables_list) == 1 else variables_list
    return PipelineResult(report, model, variables)


# ----------------------------------------------------------------------------- public


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A random subset (datasets may be stored class by class, so never a prefix)."""
    if size is None or size >= len(dataset):
        return dataset
    chosen = np.random.default_rng(seed).permutation(len(dataset))[:size]
    return IndexedDataset(dataset, np.sort(chosen))


def _datasets(dataset, common: dict) -> tuple[Dataset, Dataset]:
    if isinstance(dataset, str):
        train = load_dataset(dataset, "train", data_dir=common["data_dir"])
        test = load_dataset(dataset, "test", data_dir=common["data_dir"])
    else:
        train, test = dataset
    seed = common["seed"]
    return _subset(train, common["train_examples"], seed), _subset(
        test, common["test_examples"], seed
    )


def _start(model_name, dataset, width_multiplier, common: dict) -> tuple[nn.Module, _Context]:
    """Builds the model and the context from the arguments shared by all pipelines."""
    train, test = _datasets(dataset, common)
    if isinstance(model_name, nn.Module):
        if width_multiplier != 1.0:
            raise ValueError("width_multiplier applies to a model name, not a model instance")
        model = model_name
    else:
        model = create_model(model_name, train.num_classes, width_multiplier)
    images, _ = train.get_batch(np.array([0]))
    ctx = _Context(
        train=train,
        test=test,
        input_shape=(1,) + tuple(images.shape[1:]),
        batch_size=common["batch_size"],
        seed=common["seed"],
        augment=common["augment"],
        num_devices=common["num_devices"],
        steps_per_epoch=common["steps_per_epoch"],
        log=common["log"],
        fair_timing=common["fair_timing"],
    )
    return model, ctx


def _config(model, dataset, width_multiplier, options: dict) -> dict[str, Any]:
    """The JSON-serialisable arguments of a run."""
    config = {
        "model": model_spec(model),
        "dataset": dataset if isinstance(dataset, str) else "in-memory",
        "width_multiplier": width_multiplier,
        "devices": [str(d) for d in jax.devices()],
    }
    config.update({k: v for k, v in options.items() if k not in ("log", "workdir")})
    return json.loads(json.dumps(config, default=str))


def split_train(
    model_name: str | nn.Module = "vgg11_bn",
    dataset: str | tuple[Dataset, Dataset] = "cifar10",
    *,
    width_multiplier: float = 1.0,
    k: int = 2,
    kfold: bool = False,
    epochs: int = 300,
    batch_size: int = 128,
    optimizer_kind: str = "base",
    augment: bool = True,
    num_devices: int | None = None,
    steps_per_epoch: int | None = None,
    train_examples: int | None = None,
    test_examples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    fair_timing: bool = True,
    log: Callable[[str], None] | None = print,
) -> PipelineResult:
    """Trains k replicas on k disjoint splits (or the C(k, k/2) k-fold sets) at once.

    Args:
      model_name: a name of ``models.registry`` (``"vgg11_bn"``, ``"resnet18"``, ...) or a
        Linen model instance.
      dataset: a dataset name for :func:`train.data.load_dataset`, or ``(train, test)``.
      width_multiplier: scales the named model's widths.
      k: number of splits.
      kfold: train on the C(k, k/2) unions of k/2 parts instead of the k parts.
      epochs: training epochs of every replica.
      batch_size: examples per replica and step.
      optimizer_kind: learning-rate schedule (``"base"``, ``"finetune"``, ``"fast"``).
      augment: CIFAR crop + flip.
      num_devices: devices for the replica axis (None: all).
      steps_per_epoch: cap on steps per epoch (quick runs).
      train_examples, test_examples: use only a random subset of that many examples
        (drawn from ``seed``), e.g. for quick runs.
      data_dir: dataset directory.
      workdir: where the report and ``replica_<r>`` checkpoints go (None: nowhere).
      seed: run seed (splits, initialisations, data order).
      fair_timing: clear JAX's compilation caches before the pipeline and before the
        baseline, so that each pays for its own compilation (False: faster, e.g. tests).
      log: progress lines (None: silent).

    Returns:
      :class:`PipelineResult` with the list of replica variables.

    Example:
      >>> result = split_train("vgg11_bn", "cifar10", k=2, epochs=30, workdir="runs/split")
    """
    options = dict(locals())
    model, ctx = _start(model_name, dataset, width_multiplier, options)
    model, trained = _split_stage(ctx, "split_train", model, k, kfold, epochs, optimizer_kind)
    config = _config(model, dataset, width_multiplier, _without(options, "model_name", "dataset"))
    return _finish(ctx, "split_train", config, model, trained, workdir)


def _without(options: dict, *names: str) -> dict:
    return {k: v for k, v in options.items() if k not in names}


def _resolve(options: dict[str, Any]) -> dict[str, Any]:
    """Fills the schedule defaults and checks the pruning arguments."""
    options = dict(options)
    options.setdefault("fusion_finetune_epochs", None)
    if options["fusion_finetune_epochs"] is None:
        options["fusion_finetune_epochs"] = options["epochs_per_step"]
    if options["baseline_finetune_epochs"] is None:
        options["baseline_finetune_epochs"] = 2 * options["finetune_epochs"]
    ifjax.keep_count(1_000_000, options["sparsity"])  # raises on a bad sparsity
    if options["prune_steps"] < 1:
        raise ValueError(f"prune_steps must be >= 1, got {options['prune_steps']}")
    return options


def _conclude(ctx: _Context, pipeline: str, options: dict, dense, model, variables):
    """Runs the whole-data baseline of the dense model (if asked), writes the report."""
    if options["baseline"]:
        _baseline(ctx, dense, options)
    config = _config(
        model,
        options["dataset"],
        options["width_multiplier"],
        _without(options, "model_name", "dataset"),
    )
    return _finish(ctx, pipeline, config, model, variables, options["workdir"])


def fap(
    model_name: str | nn.Module = "vgg11_bn",
    dataset: str | tuple[Dataset, Dataset] = "cifar10",
    *,
    width_multiplier: float = 1.0,
    k: int = 2,
    kfold: bool = False,
    epochs: int = 300,
    sparsity: float = 0.6,
    prune_steps: int = 4,
    epochs_per_step: int = 10,
    finetune_epochs: int = 80,
    fusion_finetune_epochs: int | None = None,
    baseline: bool = True,
    baseline_finetune_epochs: int | None = None,
    importance: str = "l1",
    fusion_method: str = "activation",
    fusion_solver: str = "exact",
    fusion_samples: int = 200,
    batch_size: int = 128,
    optimizer_kind: str = "base",
    finetune_kind: str = "finetune",
    augment: bool = True,
    num_devices: int | None = None,
    steps_per_epoch: int | None = None,
    train_examples: int | None = None,
    test_examples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    fair_timing: bool = True,
    log: Callable[[str], None] | None = print,
) -> PipelineResult:
    """Fuse-and-Prune: split training -> fuse -> fine-tune -> prune iteratively -> fine-tune.

    Args:
      model_name, dataset, width_multiplier, k, kfold, epochs, batch_size,
        optimizer_kind, augment, num_devices, steps_per_epoch, train_examples,
        test_examples, data_dir, seed, fair_timing, log: as :func:`split_train`.
      sparsity: final fraction of every group's channels removed (all groups).
      prune_steps: pruning steps to reach it (the paper: 4).
      epochs_per_step: fine-tuning epochs after each step (the paper: 10).
      finetune_epochs: final fine-tuning epochs (the paper: 80).
      fusion_finetune_epochs: fine-tuning epochs right after fusion (default:
        ``epochs_per_step``).
      baseline: also run the whole-data baseline and report it alongside.
      baseline_finetune_epochs: the baseline's final fine-tuning (default: twice
        ``finetune_epochs``, the paper's 160 vs 80).
      importance: Intra-Fusion importance ("l1", "l2", "lamp", ...; not "taylor").
      fusion_method: ``"activation"`` (the paper) or ``"weight"``.
      fusion_solver: ``"exact"`` or ``"sinkhorn"``.
      fusion_samples: training images the activations are recorded on (the paper: 200).
      finetune_kind: learning-rate schedule of every fine-tuning.
      workdir: where ``report.{json,csv,md}`` and the final ``model`` checkpoint go.

    Returns:
      :class:`PipelineResult` of the fused, pruned, fine-tuned model.

    Example:
      >>> result = fap("vgg11_bn", "cifar10", k=2, sparsity=0.6, workdir="runs/fap")
      >>> result.report["summary"]["overall_speedup"]
    """
    options = _resolve(locals())
    dense, ctx = _start(model_name, dataset, width_multiplier, options)
    model, replicas = _split_stage(ctx, "fap", dense, k, kfold, epochs, optimizer_kind)
    model, fused = _fuse_stage(ctx, "fap", model, replicas, options)
    model, fused = _finetune_stage(
        ctx,
        "fap",
        "fusion_finetune",
        model,
        fused,
        options["fusion_finetune_epochs"],
        finetune_kind,
        4,
    )
    model, pruned = _iterative_prune(ctx, "fap", model, fused, options)
    model, final = _finetune_stage(
        ctx, "fap", "finetune", model, pruned, finetune_epochs, finetune_kind, 5
    )
    return _conclude(ctx, "fap", options, dense, model, final)


def paf(
    model_name: str | nn.Module = "vgg11_bn",
    dataset: str | tuple[Dataset, Dataset] = "cifar10",
    *,
    width_multiplier: float = 1.0,
    k: int = 2,
    kfold: bool = False,
    epochs: int = 300,
    sparsity: float = 0.6,
    prune_steps: int = 4,
    epochs_per_step: int = 10,
    finetune_epochs: int = 80,
    baseline: bool = True,
    baseline_finetune_epochs: int | None = None,
    importance: str = "l1",
    fusion_method: str = "activation",
    fusion_solver: str = "exact",
    fusion_samples: int = 200,
    batch_size: int = 128,
    optimizer_kind: str = "base",
    finetune_kind: str = "finetune",
    augment: bool = True,
    num_devices: int | None = None,
    steps_per_epoch: int | None = None,
    train_examples: int | None = None,
    test_examples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    fair_timing: bool = True,
    log: Callable[[str], None] | None = print,
) -> PipelineResult:
    """Prune-and-Fuse: split training -> prune every replica iteratively (each fine-tuned
    on all data, vmapped) -> fuse the pruned replicas -> fine-tune.

    Args: as :func:`fap` (without ``fusion_finetune_epochs``).

    Returns:
      :class:`PipelineResult` of the fused, fine-tuned model.

    Example:
      >>> result = paf("vgg11_bn", "cifar10", k=2, sparsity=0.6, workdir="runs/paf")
    """
    options = _resolve(locals())
    dense, ctx = _start(model_name, dataset, width_multiplier, options)
    model, replicas = _split_stage(ctx, "paf", dense, k, kfold, epochs, optimizer_kind)
    model, pruned = _iterative_prune(ctx, "paf", model, replicas, options)
    model, fused = _fuse_stage(ctx, "paf", model, pruned, options)
    model, final = _finetune_stage(
        ctx, "paf", "finetune", model, fused, finetune_epochs, finetune_kind, 5
    )
    return _conclude(ctx, "paf", options, dense, model, final)
