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

Their keyword options are the fields of :class:`SplitOptions` (:func:`split_train`),
:class:`PipelineOptions` (:func:`paf`) and :class:`FapOptions` (:func:`fap`).

Iterative pruning: every group goes from n to ``int(n * (1 - sparsity))`` channels in
``prune_steps`` steps, step i keeping ``int(n * (1 - sparsity * i / prune_steps))``
(Intra-Fusion, BatchNorm folded, as :func:`ifjax.prune`), each followed by
``epochs_per_step`` fine-tuning epochs.

Every stage is timed (wall clock, compilation included, evaluation excluded) and
evaluated on the test set; the report (``report.json``, ``report.csv``, ``report.md`` in
``workdir``) lists accuracy and seconds per stage next to the baseline's, with the
model-training speedup (baseline training / split training) and the overall speedup
(baseline total / pipeline total). Final variables are saved with
:func:`ifjax.checkpoint.save_model`.

Resuming: with a ``workdir``, every finished stage's models and report row are kept in
``workdir/stages`` (:mod:`train.stages`), and the training inside a stage is
checkpointed every epoch. Running the same pipeline again with the same settings skips
the finished stages (their rows, seconds included, are the recorded ones) and continues
an interrupted stage from its last epoch; the result equals an uninterrupted run. A
stage interrupted while training reports the recorded seconds of its checkpointed
epochs plus the time of the attempt that finished it. Other settings in the same
``workdir`` raise a ValueError naming the differing keys; ``overwrite=True`` starts over.
"""

from __future__ import annotations

import dataclasses
import inspect
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
from ifjax import fuse
from ifjax.checkpoint import save_model
from models.registry import create_model, init_variables, model_spec
from train.data import Dataset, IndexedDataset, batches, load_dataset, random_subset
from train.options import (
    FRACTION,
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SPARSITY,
    Options,
    option,
)
from train.split import (
    STRATEGIES,
    evaluate_models,
    kfold_training_sets,
    replica_seed,
    split_indices,
    train_replicas,
)
from train.stages import StageStore
from train.training import SCHEDULES, sync_processes

__all__ = [
    "REPORT_COLUMNS",
    "FapOptions",
    "PipelineOptions",
    "PipelineResult",
    "SplitOptions",
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


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class SplitOptions(Options):
    """The options of :func:`split_train`, shared by :func:`fap` and :func:`paf`.

    Each field's help, choices and check are in its :func:`train.options.option`; the
    ``ifjax split-train`` command line is generated from them.

    Attributes:
      width_multiplier: scales the named model's widths.
      k: number of splits.
      kfold: train on the C(k, k/2) unions of k/2 parts instead of the k parts.
      epochs: training epochs of every replica.
      batch_size: examples per replica and step.
      optimizer_kind: learning-rate schedule (``"base"``, ``"finetune"``, ``"fast"``).
      augment: CIFAR crop + flip.
      label_smoothing: the training loss's label smoothing, in [0, 1) (see
        :func:`train.training.cross_entropy`).
      num_devices: devices for the replica axis (None: all).
      strategy: replica strategy of :func:`train.split.train_replicas` (``"auto"``,
        ``"vmap"``, ``"shard"``, ``"sequential"``); changes the speed only, so a run
        resumes under another one.
      steps_per_epoch: cap on steps per epoch (quick runs).
      train_examples, test_examples: use only a random subset of that many examples
        (drawn from ``seed``), e.g. for quick runs.
      data_dir: dataset directory.
      workdir: where the report, the final checkpoints and the finished stages go (None:
        nowhere, and nothing to resume). A rerun in the same ``workdir`` resumes.
      overwrite: start over in a ``workdir`` that holds a run with other settings
        (without it, such a rerun raises a ValueError naming the differing settings).
      seed: run seed (splits, initialisations, data order).
      fair_timing: clear JAX's compilation caches before the pipeline and before the
        baseline, so that each pays for its own compilation (False: faster, e.g. tests).
      log: progress lines (None: silent); with several processes only process 0 logs.
    """

    width_multiplier: float = option(1.0, check=POSITIVE_FLOAT)
    k: int = option(2, check=POSITIVE_INT, help="number of disjoint splits")
    kfold: bool = option(False, help="train the C(k, k/2) k-fold sets")
    epochs: int = option(300, check=POSITIVE_INT, help="replica training epochs")
    batch_size: int = option(128, check=POSITIVE_INT)
    optimizer_kind: str = option("base", flag="--schedule", choices=SCHEDULES)
    augment: bool = option(True, command_line=False)
    label_smoothing: float = option(
        0.0,
        check=FRACTION,
        recorded="when_set",
        help="smooth the training loss's targets by this (default 0)",
    )
    num_devices: int | None = option(None, check=POSITIVE_INT, help="devices for the replica axis")
    strategy: str = option(
        "auto",
        flag="--replica-strategy",
        choices=STRATEGIES,
        recorded="never",
        help="how the k replicas train: vmap, shard (over devices), sequential, or auto "
        "(sequential on CPU, vmap on GPU/TPU, shard with several devices); speed only",
    )
    steps_per_epoch: int | None = option(None, check=POSITIVE_INT, help="cap (quick runs)")
    train_examples: int | None = option(
        None, flag="--train-subset", check=POSITIVE_INT, help="random subset of training images"
    )
    test_examples: int | None = option(
        None, flag="--test-subset", check=POSITIVE_INT, help="random subset of test images"
    )
    data_dir: str | os.PathLike | None = option(
        None, help="tfds data dir (default $IFJAX_DATA_DIR, ...)"
    )
    workdir: str | os.PathLike | None = option(
        None,
        required=True,
        recorded="never",
        help="report.{json,csv,md}, models and finished stages",
    )
    overwrite: bool = option(
        False,
        recorded="never",
        help="start over in a workdir that holds a run with other settings (default: "
        "resume a run with the same settings, refuse other settings)",
    )
    seed: int = option(0)
    fair_timing: bool = option(True, command_line=False)
    log: Callable[[str], None] | None = option(print, command_line=False, recorded="never")


@dataclasses.dataclass(frozen=True)
class PipelineOptions(SplitOptions):
    """The options of :func:`paf` (and :func:`fap`): those of :class:`SplitOptions`, and

    Attributes:
      sparsity: final fraction of every group's channels removed (all groups).
      prune_steps: pruning steps to reach it (the paper: 4).
      epochs_per_step: fine-tuning epochs after each step (the paper: 10; 0: none, so
        every step's row is the pruned model before any fine-tuning).
      finetune_epochs: final fine-tuning epochs (the paper: 80).
      baseline: also run the whole-data baseline and report it alongside.
      baseline_finetune_epochs: the baseline's final fine-tuning (None: twice
        ``finetune_epochs``, the paper's 160 vs 80).
      importance: Intra-Fusion importance ("l1", "l2", "lamp", ...; not "taylor").
      fusion_method: ``"activation"`` (the paper) or ``"weight"``.
      fusion_solver: ``"exact"`` or ``"sinkhorn"``.
      fusion_samples: training images the activations are recorded on (the paper: 200).
      finetune_kind: learning-rate schedule of every fine-tuning.
      recalibrate: re-estimate BatchNorm statistics (:func:`ifjax.recalibrate_batchnorm`)
        on that many training images (a random subset drawn with ``seed``) after every
        pruning step, before its fine-tuning, and after fusion; 0: never (recorded in
        the settings only when set).
    """

    sparsity: float = option(0.6, check=SPARSITY, help="final, all groups")
    prune_steps: int = option(4, check=POSITIVE_INT)
    epochs_per_step: int = option(10, check=NONNEGATIVE_INT, help="0: no fine-tuning")
    finetune_epochs: int = option(80, check=POSITIVE_INT)
    baseline: bool = option(True, flag="--no-baseline", help="skip the whole-data model")
    baseline_finetune_epochs: int | None = option(None, check=NONNEGATIVE_INT, command_line=False)
    importance: str = option("l1", choices=ifjax.IMPORTANCES)
    fusion_method: str = option("activation", choices=ifjax.FUSION_METHODS)
    fusion_solver: str = option("exact", choices=("exact", "sinkhorn"))
    fusion_samples: int = option(200, check=POSITIVE_INT, command_line=False)
    finetune_kind: str = option("finetune", choices=SCHEDULES, command_line=False)
    recalibrate: int = option(
        0,
        check=NONNEGATIVE_INT,
        metavar="N",
        recorded="when_set",
        help="re-estimate BatchNorm statistics on N training images after every pruning "
        "step and after fusion (0: no)",
    )

    def resolved(self) -> PipelineOptions:
        """A copy with the defaults that depend on other options filled in."""
        if self.baseline_finetune_epochs is not None:
            return self
        return dataclasses.replace(self, baseline_finetune_epochs=2 * self.finetune_epochs)


@dataclasses.dataclass(frozen=True)
class FapOptions(PipelineOptions):
    """The options of :func:`fap`: those of :class:`PipelineOptions`, and

    Attributes:
      fusion_finetune_epochs: fine-tuning epochs right after fusion (None:
        ``epochs_per_step``).
    """

    fusion_finetune_epochs: int | None = option(None, check=NONNEGATIVE_INT, command_line=False)

    def resolved(self) -> FapOptions:
        """A copy with the defaults that depend on other options filled in."""
        resolved = super().resolved()
        if resolved.fusion_finetune_epochs is not None:
            return resolved
        return dataclasses.replace(resolved, fusion_finetune_epochs=self.epochs_per_step)


def _takes(options_class: type[SplitOptions]):
    """Gives a pipeline ``(model_name, dataset, **options)`` the keyword-only signature of
    ``options_class``, so that ``help`` and ``inspect.signature`` show every option."""

    def decorate(function):
        head = list(inspect.signature(function).parameters.values())[:2]
        keyword = inspect.Parameter.KEYWORD_ONLY
        options = [
            inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type)
            for f in dataclasses.fields(options_class)
        ]
        function.__signature__ = inspect.Signature(head + options, return_annotation=PipelineResult)
        return function

    return decorate


def _options(options_class: type[SplitOptions], pipeline: str, given: dict[str, Any]):
    """``options_class(**given)``, an unknown keyword named as a call's TypeError would."""
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(
            f"{pipeline}() got unexpected keyword arguments {unknown}; its options are the "
            f"fields of {options_class.__name__}"
        )
    return options_class(**given)


# ----------------------------------------------------------------------------- context


@dataclasses.dataclass
class _Context:
    """The data, the options, the stage store and the rows recorded so far."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    options: SplitOptions
    settings: dict[str, Any]
    store: StageStore | None
    log: Callable[[str], None] | None
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    initials: dict[tuple[Any, int], Any] = dataclasses.field(default_factory=dict)
    # the running stage's training checkpoints, and seconds its earlier attempts recorded
    checkpoint_dir: Path | None = None
    carried_seconds: float = 0.0

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def fit(self, model, variables_list, datasets, epochs: int, kind: str, salt: int):
        """Trains the models (vmapped) on their datasets; a no-op for 0 epochs.

        Resumes from the running stage's training checkpoint, if there is one.
        """
        if epochs <= 0:
            return list(variables_list)
        trained, history = train_replicas(
            model,
            variables_list,
            datasets,
            epochs=epochs,
            batch_size=self.options.batch_size,
            optimizer_kind=kind,
            seed=replica_seed(self.options.seed, 10_000 + salt),
            augment=self.options.augment,
            label_smoothing=self.options.label_smoothing,
            num_devices=self.options.num_devices,
            strategy=self.options.strategy,
            steps_per_epoch=self.options.steps_per_epoch,
            workdir=self.checkpoint_dir,
            log=self.log,
        )
        self.carried_seconds += sum(r["epoch_seconds"] for r in history if r.get("restored"))
        return trained

    def evaluate(self, model, variables_list) -> list[float]:
        scores = evaluate_models(
            model,
            variables_list,
            lambda: batches(self.test, 256, shuffle=False, augment=False),
            strategy=self.options.strategy,
            num_devices=self.options.num_devices,
        )
        return [s["top1"] for s in scores]

    def initial(self, model, count: int) -> list[dict[str, Any]]:
        """Initial variables of replica 0..count-1 (the baseline starts from replica 0's)."""
        for r in range(count):
            if (model, r) not in self.initials:
                seed = replica_seed(self.options.seed, r)
                self.initials[model, r] = init_variables(model, seed, self.input_shape)
        return [self.initials[model, r] for r in range(count)]

    def fresh_start(self) -> None:
        """With ``fair_timing``, forgets compiled programs so a pipeline compiles its own."""
        if self.options.fair_timing:
            jax.clear_caches()

    def stage(
        self,
        pipeline: str,
        name: str,
        run: Callable[[], tuple[Any, list]],
        before: Callable[[], Any] | None = None,
    ):
        """Runs a stage ``() -> (model, variables_list)``, times it, evaluates, records.

        A stage finished by an earlier run in the workdir is loaded instead (its row as
        recorded); otherwise ``before`` (untimed) runs first, and the stage's training
        (at most one :meth:`fit`) checkpoints into, and resumes from, the stage's store.
        """
        index = sum(1 for r in self.rows if r["pipeline"] == pipeline)
        if self.store is not None:
            finished = self.store.load(pipeline, index, name)
            if finished is not None:
                model, variables_list, row = finished
                self.rows.append(row)
                self.say(f"[{pipeline}] {name}: finished before, top1 {row['top1']:.4f}")
                return model, variables_list
        if before is not None:
            before()
        self.say(f"[{pipeline}] {name} ...")
        if self.store is not None:
            self.checkpoint_dir = self.store.training_dir(pipeline, index, name)
        self.carried_seconds = 0.0
        start = time.perf_counter()
        try:
            model, variables_list = run()
            jax.block_until_ready(variables_list)
        finally:
            self.checkpoint_dir = None
        seconds = time.perf_counter() - start + self.carried_seconds
        top1 = self.evaluate(model, variables_list)
        before_seconds = sum(r["seconds"] for r in self.rows if r["pipeline"] == pipeline)
        row = {
            "pipeline": pipeline,
            "stage": name,
            "models": len(variables_list),
            "top1": float(np.mean(top1)),
            "top1_each": top1,
            "params": _count_params(variables_list[0]),
            "seconds": seconds,
            "cumulative_seconds": before_seconds + seconds,
        }
        self.rows.append(row)
        if self.store is not None:
            self.store.save(pipeline, index, name, model, variables_list, row)
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
    apply_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prunes every group to the given channel count (Intra-Fusion by default).

    Every BatchNorm is folded first, then each group that narrows, from group 0 on, is
    pruned to exactly ``targets[group.index]`` channels: one :func:`ifjax.prune` with
    ``widths`` (groups already that narrow are left alone).

    Args:
      model: any Linen model (the models of ``models/`` or a user's).
      variables: its variables.
      targets: ``{group index: channels to keep}``.
      example_input: an input batch, to discover the groups.
      importance: importance metric (see :func:`ifjax.group_importance`).
      method: ``"intra_fusion"`` or ``"default"``.
      apply_kwargs: extra ``model.apply`` arguments of every trace (e.g.
        ``{"train": False}`` for a model whose default is training mode).

    Returns:
      ``(pruned_model, pruned_variables)``.
    """
    groups = ifjax.discover_groups(model, variables, example_input, apply_kwargs=apply_kwargs)
    narrower = [g for g in groups if targets[g.index] < g.size]
    model, variables, _ = ifjax.prune(
        model,
        variables,
        narrower,
        widths={g.index: targets[g.index] for g in narrower},
        method=method,
        importance=importance,
        example_input=example_input,  # every BatchNorm is folded, as for all groups
        apply_kwargs=apply_kwargs,
    )
    return model, variables


def _widths(model, variables, example_input) -> dict[int, int]:
    return {g.index: g.size for g in ifjax.discover_groups(model, variables, example_input)}


def _iterative_prune(ctx: _Context, pipeline: str, model, variables_list):
    """``prune_steps`` x (prune every model, fine-tune each on all data) stages."""
    opts = ctx.options
    example = np.zeros(ctx.input_shape, np.float32)
    schedule = prune_schedule(
        _widths(model, variables_list[0], example), opts.sparsity, opts.prune_steps
    )
    for step, targets in enumerate(schedule, start=1):

        def run(model=model, variables_list=variables_list, targets=targets, step=step):
            pruned = [
                prune_to_widths(
                    model, v, targets, example_input=example, importance=opts.importance
                )
                for v in variables_list
            ]
            model = pruned[0][0]
            tuned = ctx.fit(
                model,
                _recalibrated(ctx, model, [v for _, v in pruned]),
                [ctx.train] * len(pruned),
                opts.epochs_per_step,
                opts.finetune_kind,
                salt=100 + step,
            )
            return model, tuned

        model, variables_list = ctx.stage(pipeline, f"prune_step_{step}", run)
    return model, variables_list


def _recalibrated(ctx: _Context, model, variables_list) -> list[Any]:
    """Every model's BatchNorm statistics re-estimated on ``recalibrate`` training images
    (a random subset drawn with the seed, batches of 128, no augmentation); unchanged
    when ``recalibrate`` is 0."""
    images = ctx.options.recalibrate
    if not images:
        return list(variables_list)
    subset = _subset(ctx.train, images, ctx.options.seed)
    batch_list = list(batches(subset, 128, shuffle=False, augment=False, num_threads=0))
    return [ifjax.recalibrate_batchnorm(model, v, batch_list) for v in variables_list]


# ----------------------------------------------------------------------------- stages


def _split_stage(ctx: _Context, pipeline: str, model):
    opts = ctx.options
    splits = kfold_training_sets if opts.kfold else split_indices
    index_sets = splits(len(ctx.train), opts.k, opts.seed)
    datasets = [IndexedDataset(ctx.train, indices) for indices in index_sets]

    def before():
        ctx.initial(model, len(datasets))
        ctx.fresh_start()

    def run():
        initial = ctx.initial(model, len(datasets))
        return model, ctx.fit(model, initial, datasets, opts.epochs, opts.optimizer_kind, salt=1)

    return ctx.stage(pipeline, "split_train", run, before)


def _fuse_stage(ctx: _Context, pipeline: str, model, variables_list):
    opts = ctx.options
    samples = min(opts.fusion_samples, len(ctx.train))
    # a random sample: datasets may be stored class by class (cifar10_jpeg is)
    sample = batches(ctx.train, samples, shuffle=True, augment=False, seed=opts.seed, num_threads=0)
    images = next(iter(sample))["image"]

    def run():
        fused = fuse(
            model,
            variables_list,
            inputs=images,
            num_samples=samples,
            method=opts.fusion_method,
            solver=opts.fusion_solver,
        )
        return model, _recalibrated(ctx, model, [fused])

    return ctx.stage(pipeline, "fuse", run)


def _finetune_stage(ctx: _Context, pipeline, name, model, variables_list, epochs, salt):
    kind = ctx.options.finetune_kind
    run = lambda: (model, ctx.fit(model, variables_list, [ctx.train], epochs, kind, salt))
    return ctx.stage(pipeline, name, run)


def _baseline(ctx: _Context, model):
    """The whole-data model: train, prune iteratively, fine-tune."""
    opts = ctx.options

    def before():
        ctx.initial(model, 1)
        ctx.fresh_start()

    def run():
        initial = ctx.initial(model, 1)
        return model, ctx.fit(model, initial, [ctx.train], opts.epochs, opts.optimizer_kind, 2)

    model, variables = ctx.stage("baseline", "train", run, before)
    model, variables = _iterative_prune(ctx, "baseline", model, variables)
    epochs = opts.baseline_finetune_epochs
    return _finetune_stage(ctx, "baseline", "finetune", model, variables, epochs, 3)


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


def _finish(ctx: _Context, pipeline: str, model, variables_list) -> PipelineResult:
    """Writes the report and the final checkpoints (process 0) and returns the result."""
    report = {
        "pipeline": pipeline,
        "config": ctx.settings,
        "rows": ctx.rows,
        "summary": _summary(ctx.rows, pipeline),
    }
    workdir = ctx.options.workdir
    if workdir is not None and jax.process_index() == 0:
        workdir = Path(workdir)
        _write_report(workdir, report)
        names = ["model"] if len(variables_list) == 1 else [f"replica_{r}" for r in range(99)]
        metadata = {"pipeline": pipeline, "config": ctx.settings}
        for name, variables in zip(names, variables_list, strict=False):
            spec = model_spec(model)
            save_model(
                workdir / name, variables, model_spec=spec, metadata=metadata, overwrite=True
            )
    sync_processes("ifjax_pipeline_finished")
    ctx.say(_markdown(report))
    variables = variables_list[0] if len(variables_list) == 1 else variables_list
    return PipelineResult(report, model, variables)


# ----------------------------------------------------------------------------- public


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """:func:`train.data.random_subset` of ``size`` examples (None or more: all of them)."""
    return (
        dataset if size is None or size >= len(dataset) else random_subset(dataset, size, seed=seed)
    )


def _datasets(dataset, opts: SplitOptions) -> tuple[Dataset, Dataset]:
    if isinstance(dataset, str):
        train = load_dataset(dataset, "train", data_dir=opts.data_dir)
        test = load_dataset(dataset, "test", data_dir=opts.data_dir)
    else:
        train, test = dataset
    return (
        _subset(train, opts.train_examples, opts.seed),
        _subset(test, opts.test_examples, opts.seed),
    )


def _start(pipeline: str, model_name, dataset, opts: SplitOptions) -> tuple[nn.Module, _Context]:
    """Builds the model and the context, and opens (or checks) the workdir's stages."""
    train, test = _datasets(dataset, opts)
    if getattr(opts, "recalibrate", 0) > len(train):
        raise ValueError(
            f"recalibrate asks for {opts.recalibrate} training images; the training set "
            f"has {len(train)}"
        )
    if isinstance(model_name, nn.Module):
        if opts.width_multiplier != 1.0:
            raise ValueError("width_multiplier applies to a model name, not a model instance")
        model = model_name
    else:
        model = create_model(model_name, train.num_classes, opts.width_multiplier)
    settings = {
        "model": model_spec(model),
        "dataset": dataset if isinstance(dataset, str) else "in-memory",
        "devices": [str(d) for d in jax.devices()],
        **opts.settings(),
    }
    settings = json.loads(json.dumps(settings, default=str))
    store = None
    if opts.workdir is not None:
        store = StageStore.open(opts.workdir, pipeline, settings, overwrite=opts.overwrite)
    images, _ = train.get_batch(np.array([0]))
    ctx = _Context(
        train=train,
        test=test,
        input_shape=(1,) + tuple(images.shape[1:]),
        options=opts,
        settings=settings,
        store=store,
        log=opts.log if jax.process_index() == 0 else None,
    )
    return model, ctx


@_takes(SplitOptions)
def split_train(
    model_name: str | nn.Module = "vgg11_bn",
    dataset: str | tuple[Dataset, Dataset] = "cifar10",
    **options: Any,
) -> PipelineResult:
    """Trains k replicas on k disjoint splits (or the C(k, k/2) k-fold sets) at once.

    Args:
      model_name: a name of ``models.registry`` (``"vgg11_bn"``, ``"resnet18"``, ...) or a
        Linen model instance.
      dataset: a dataset name for :func:`train.data.load_dataset`, or ``(train, test)``.
      **options: keyword-only, the fields of :class:`SplitOptions` (``k``, ``epochs``,
        ``workdir``, ``seed``, ...). ``workdir`` gets the report and the ``replica_<r>``
        checkpoints; a rerun there resumes.

    Returns:
      :class:`PipelineResult` with the list of replica variables.

    Example:
      >>> result = split_train("vgg11_bn", "cifar10", k=2, epochs=30, workdir="runs/split")
    """
    opts = _options(SplitOptions, "split_train", options)
    model, ctx = _start("split_train", model_name, dataset, opts)
    model, trained = _split_stage(ctx, "split_train", model)
    return _finish(ctx, "split_train", model, trained)


def _conclude(ctx: _Context, pipeline: str, dense, model, variables) -> PipelineResult:
    """Runs the whole-data baseline of the dense model (if asked), writes the report."""
    if ctx.options.baseline:
        _baseline(ctx, dense)
    return _finish(ctx, pipeline, model, variables)


@_takes(FapOptions)
def fap(
    model_name: str | nn.Module = "vgg11_bn",
    dataset: str | tuple[Dataset, Dataset] = "cifar10",
    **options: Any,
) -> PipelineResult:
    """Fuse-and-Prune: split training -> fuse -> fine-tune -> prune iteratively -> fine-tune.

    Args:
      model_name, dataset: as :func:`split_train`.
      **options: keyword-only, the fields of :class:`FapOptions`: those of
        :func:`split_train`, the pruning and fusion options (``sparsity``,
        ``prune_steps``, ``epochs_per_step``, ``finetune_epochs``, ``baseline``, ...) and
        ``fusion_finetune_epochs``. ``workdir`` gets ``report.{json,csv,md}``, the final
        ``model`` checkpoint and the finished stages; a rerun there resumes.

    Returns:
      :class:`PipelineResult` of the fused, pruned, fine-tuned model.

    Example:
      >>> result = fap("vgg11_bn", "cifar10", k=2, sparsity=0.6, workdir="runs/fap")
      >>> result.report["summary"]["overall_speedup"]
    """
    opts = _options(FapOptions, "fap", options).resolved()
    dense, ctx = _start("fap", model_name, dataset, opts)
    model, replicas = _split_stage(ctx, "fap", dense)
    model, fused = _fuse_stage(ctx, "fap", model, replicas)
    epochs = opts.fusion_finetune_epochs
    model, fused = _finetune_stage(ctx, "fap", "fusion_finetune", model, fused, epochs, 4)
    model, pruned = _iterative_prune(ctx, "fap", model, fused)
    epochs = opts.finetune_epochs
    model, final = _finetune_stage(ctx, "fap", "finetune", model, pruned, epochs, 5)
    return _conclude(ctx, "fap", dense, model, final)


@_takes(PipelineOptions)
def paf(
    model_name: str | nn.Module = "vgg11_bn",
    dataset: str | tuple[Dataset, Dataset] = "cifar10",
    **options: Any,
) -> PipelineResult:
    """Prune-and-Fuse: split training -> prune every replica iteratively (each fine-tuned
    on all data, vmapped) -> fuse the pruned replicas -> fine-tune.

    Args:
      model_name, dataset: as :func:`split_train`.
      **options: keyword-only, the fields of :class:`PipelineOptions` (as :func:`fap`,
        without ``fusion_finetune_epochs``).

    Returns:
      :class:`PipelineResult` of the fused, fine-tuned model.

    Example:
      >>> result = paf("vgg11_bn", "cifar10", k=2, sparsity=0.6, workdir="runs/paf")
    """
    opts = _options(PipelineOptions, "paf", options).resolved()
    dense, ctx = _start("paf", model_name, dataset, opts)
    model, replicas = _split_stage(ctx, "paf", dense)
    model, pruned = _iterative_prune(ctx, "paf", model, replicas)
    model, fused = _fuse_stage(ctx, "paf", model, pruned)
    epochs = opts.finetune_epochs
    model, final = _finetune_stage(ctx, "paf", "finetune", model, fused, epochs, 5)
    return _conclude(ctx, "paf", dense, model, final)
