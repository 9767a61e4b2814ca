"""The command line's jobs: train, evaluate, prune, fine-tune, the data-free sweep, the demo.

Each job is a function with keyword arguments that reads and writes checkpoints
(:mod:`ifjax.checkpoint`) and returns a small summary dict; ``train/cli.py`` only parses
arguments and prints. A model checkpoint's ``metadata`` carries what the jobs need to
carry on from it: ``model`` (registry name), ``dataset``, ``width_multiplier``,
``image_size`` and ``test_top1``; its ``history`` lists the pruning (and fine-tuning)
steps applied since the dense model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ifjax
from ifjax.checkpoint import restore_model, save_model
from models.registry import build_model, create_model, init_variables, model_spec
from train import data as data_lib
from train import paper as paper_lib
from train import sweep, training

__all__ = [
    "DEMO",
    "Restored",
    "datafree",
    "default_compilation_cache",
    "demo",
    "enable_compilation_cache",
    "evaluate_checkpoint",
    "finetune",
    "load_split",
    "prune_checkpoint",
    "recalibration_batches",
    "restore",
    "train",
]

# The demo: a small VGG11-BN trained on CIFAR-10, then the data-free sweep, in about ten
# minutes on a 2-core CPU (data preparation and compilation included). CIFAR-10 comes from
# a prepared copy, the offline zip or the official download (train.data.load_dataset).
DEMO = dict(
    model="vgg11_bn",
    dataset="cifar10",
    width_multiplier=0.125,
    epochs=6,
    batch_size=128,
    schedule="fast",
    train_subset=None,
    groups="all",
    sparsities=(0.1, 0.3, 0.5, 0.7),
    importances=("l1",),
    methods=("default", "intra_fusion"),
    solver="exact",
    test_subset=None,
)
EVAL_BATCH_SIZE = 500


def default_compilation_cache() -> Path | None:
    """``$IFJAX_COMPILATION_CACHE`` ("off" disables) or ``~/.cache/ifjax/jax``."""
    configured = os.environ.get("IFJAX_COMPILATION_CACHE")
    if configured is not None and configured.lower() in ("", "0", "off", "none"):
        return None
    return Path(configured or "~/.cache/ifjax/jax").expanduser()


def enable_compilation_cache(directory: str | os.PathLike | None) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` (None: off).

    Every compiled function is cached (no minimum compile time or size), so a second
    run of a command skips most compilation.
    """
    if directory is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    zip_path: str | None = None,
    subset: int | None = None,
    seed: int = 0,
) -> data_lib.Dataset:
    """Loads a split, optionally a random subset of ``subset`` examples (seeded).

    CIFAR splits of the offline zip are ordered class by class, so a subset is drawn at
    random (:func:`train.data.random_subset`), never taken from the front.
    """
    loaded = data_lib.load_dataset(dataset, split, data_dir=data_dir, zip_path=zip_path)
    return _random_subset(loaded, subset, seed, dataset)


def _random_subset(loaded: data_lib.Dataset, subset: int | None, seed: int, name: str):
    if subset is None or subset >= len(loaded):
        return loaded
    if not isinstance(loaded, data_lib.ArrayDataset):
        raise ValueError(f"subsets of {name} (not held in memory) are not supported")
    return data_lib.random_subset(loaded, subset, seed=seed)


def recalibration_batches(
    dataset: str,
    images: int,
    *,
    data_dir: str | None = None,
    zip_path: str | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``images`` training images of ``dataset`` (a random subset drawn with ``seed``) in
    batches of 128, without augmentation: what :func:`ifjax.recalibrate_batchnorm` runs on.

    Raises:
      ValueError: ``images`` is not in [1, the number of training images].
    """
    train_set = load_split(dataset, "train", data_dir=data_dir, zip_path=zip_path)
    if not 0 < images <= len(train_set):
        raise ValueError(
            f"recalibrate must be in [1, {len(train_set)}] (the training images of "
            f"{dataset}), got {images}"
        )
    subset = _random_subset(train_set, images, seed, dataset)
    return list(data_lib.batches(subset, 128, shuffle=False, augment=False))


@dataclasses.dataclass(frozen=True)
class Restored:
    """A model checkpoint: the rebuilt model, its variables and its stored information."""

    model: Any
    variables: dict[str, Any]
    info: dict[str, Any]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.info.get("metadata", {})

    @property
    def example_input(self) -> jnp.ndarray:
        size = int(self.metadata.get("image_size", 32))
        return jnp.zeros((1, size, size, 3), jnp.float32)

    def dataset(self, override: str | None) -> str:
        """``override``, else the dataset the checkpoint was trained on."""
        name = override or self.metadata.get("dataset")
        if name is None:
            raise ValueError("the checkpoint does not say its dataset: pass --dataset")
        return name


def restore(checkpoint: str | os.PathLike) -> Restored:
    """Restores a model checkpoint and rebuilds its (possibly pruned) model from the spec."""
    variables, info = restore_model(checkpoint)
    return Restored(build_model(info["model_spec"]), variables, info)


def _eval_batches(test_set: data_lib.Dataset, batch_size: int = EVAL_BATCH_SIZE):
    return lambda: data_lib.batches(test_set, batch_size, shuffle=False, augment=False)


def _fit_and_save(
    model: Any,
    variables: Mapping[str, Any],
    train_set: data_lib.Dataset,
    test_set: data_lib.Dataset,
    *,
    options: Mapping[str, Any],
    workdir: Path,
    history: list[dict[str, Any]],
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Runs :func:`train.training.fit` and saves ``workdir/model`` once all epochs are done."""
    batch_size, seed = options["batch_size"], options["seed"]
    steps = data_lib.steps_per_epoch(len(train_set), batch_size, drop_remainder=True)
    if steps < 1:
        raise ValueError(f"batch size {batch_size} exceeds the {len(train_set)} training images")

    def train_batches(epoch: int, start_step: int):
        return data_lib.batches(
            train_set,
            batch_size,
            shuffle=True,
            augment=True,
            seed=seed,
            epoch=epoch,
            drop_remainder=True,
            start_step=start_step,
        )

    final, metrics = training.fit(
        model,
        variables,
        train_batches=train_batches,
        eval_batches=_eval_batches(test_set),
        epochs=options["epochs"],
        steps_per_epoch=steps,
        optimizer_kind=options["schedule"],
        workdir=workdir,
        seed=seed,
        max_steps=options.get("max_steps"),
        checkpoint_every_steps=options.get("checkpoint_every"),
        **{k: options[k] for k in _TRAINING_OPTIONS if k in options},
    )
    summary = {"workdir": str(workdir), "epochs_done": len(metrics), "history": metrics}
    if len(metrics) < options["epochs"]:
        return summary | {"finished": False, "checkpoint": None}
    metadata = metadata | {"test_top1": 100 * metrics[-1]["test_top1"]}
    path = save_model(
        workdir / "model",
        final,
        model_spec=model_spec(model),
        history=history,
        metadata=metadata,
        overwrite=True,
    )
    return summary | {"finished": True, "checkpoint": str(path), "test_top1": metadata["test_top1"]}


_TRAINING_OPTIONS = ("optimizer", "peak_lr", "weight_decay", "label_smoothing")


def _training_options(
    optimizer: str, peak_lr: float | None, weight_decay: float | None, label_smoothing: float
) -> dict[str, Any]:
    """The training settings that differ from the training stack's defaults (only those
    are recorded, so that runs made before these options existed still resume)."""
    options = {"optimizer": optimizer} if optimizer != "sgd" else {}
    options |= {"peak_lr": peak_lr} if peak_lr is not None else {}
    options |= {"weight_decay": weight_decay} if weight_decay is not None else {}
    return options | ({"label_smoothing": label_smoothing} if label_smoothing else {})


def train(
    *,
    model: str,
    dataset: str,
    workdir: str | os.PathLike,
    width_multiplier: float = 1.0,
    epochs: int = 300,
    batch_size: int = 128,
    schedule: str = "base",
    seed: int = 0,
    data_dir: str | None = None,
    zip_path: str | None = None,
    train_subset: int | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    optimizer: str = "sgd",
    peak_lr: float | None = None,
    weight_decay: float | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, Any]:
    """Trains a model of the paper from scratch; resumes from ``workdir`` if it can.

    ``optimizer``, ``peak_lr`` and ``weight_decay`` (default: the training stack's)
    choose e.g. AdamW for the ViT (see :func:`train.training.make_optimizer`);
    ``label_smoothing`` smooths the training loss's targets (see
    :func:`train.training.cross_entropy`).

    Returns:
      ``{"finished", "checkpoint" (workdir/model once finished), "test_top1" (percent),
      "epochs_done", "history", "workdir", "data_source"}`` (where the data came from).
    """
    train_set = load_split(
        dataset, "train", data_dir=data_dir, zip_path=zip_path, subset=train_subset, seed=seed
    )
    test_set = load_split(dataset, "test", data_dir=data_dir, zip_path=zip_path)
    network = create_model(model, train_set.num_classes, width_multiplier)
    image_size = int(train_set.get_batch(np.arange(1))[0].shape[1])
    variables = init_variables(network, seed, (1, image_size, image_size, 3))
    options = dict(epochs=epochs, batch_size=batch_size, schedule=schedule, seed=seed)
    options |= _training_options(optimizer, peak_lr, weight_decay, label_smoothing)
    metadata = dict(
        model=model,
        dataset=dataset,
        width_multiplier=width_multiplier,
        num_classes=train_set.num_classes,
        image_size=image_size,
        training=options | {"train_subset": train_subset, "train_images": len(train_set)},
    )
    summary = _fit_and_save(
        network,
        variables,
        train_set,
        test_set,
        options=options | {"max_steps": max_steps, "checkpoint_every": checkpoint_every},
        workdir=Path(workdir).absolute(),
        history=[],
        metadata=metadata,
    )
    return summary | {"data_source": getattr(train_set, "source", "")}


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    zip_path: str | None = None,
    test_subset: int | None = None,
) -> dict[str, Any]:
    """Top-1 (percent) and loss of a checkpoint on the test split of its dataset."""
    restored = restore(checkpoint)
    name = restored.dataset(dataset)
    test_set = load_split(name, "test", data_dir=data_dir, zip_path=zip_path, subset=test_subset)
    result = training.evaluate(restored.model, restored.variables, _eval_batches(test_set)())
    return {"dataset": name, "top1": 100 * result["top1"], "loss": result["loss"]} | {
        "count": result["count"]
    }


def _taylor(restored: Restored, folded, name: str, data_dir, zip_path, seed: int):
    train_set = load_split(name, "train", data_dir=data_dir, zip_path=zip_path)
    return sweep.taylor_gradients(restored.model, folded, train_set, seed=seed)


def prune_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    groups: str | Sequence[int] = "all",
    sparsity: float,
    method: str = "intra_fusion",
    importance: str = "l1",
    options: Mapping[str, Any] | None = None,
    round_to: int = 1,
    recalibrate: int = 0,
    evaluate: bool = False,
    dataset: str | None = None,
    data_dir: str | None = None,
    zip_path: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prunes groups of a checkpoint (physically) and saves it with its history extended.

    ``recalibrate``: re-estimate the pruned model's BatchNorm statistics on that many
    training images (a random subset drawn with ``seed``, batches of 128, no augmentation,
    :func:`ifjax.recalibrate_batchnorm`); 0 keeps the folded statistics.

    BatchNorm is folded in every group first (as the reference); taylor importance uses
    gradients summed over 5 batches of 128 training images on the folded model.
    ``options`` (marginals, target, solver, epsilon, map_normalization) are Intra-Fusion's;
    ``round_to``: kept counts are multiples of it (either method).

    Returns:
      ``{"checkpoint", "groups", "history_entry", "params_before", "params_after",
      "widths_changed" ({layer: (before, after)})}`` and, with ``evaluate``,
      ``"top1_before"`` and ``"top1_after"`` (percent).
    """
    restored = restore(checkpoint)
    if Path(out).exists() and not overwrite:
        raise ValueError(f"output {out} exists; pass --overwrite to replace it")
    model, variables = restored.model, restored.variables
    all_groups = ifjax.discover_groups(model, variables, restored.example_input)
    indices = [index for index, _ in sweep.select_groups(all_groups, groups)]
    folded = ifjax.fold_batchnorm(variables, all_groups)
    if recalibrate < 0:
        raise ValueError(f"recalibrate is a number of images >= 0, got {recalibrate}")
    uses_data = evaluate or importance == "taylor" or recalibrate
    name = restored.dataset(dataset) if uses_data else None
    gradients = None
    if importance == "taylor":
        gradients = _taylor(restored, folded, name, data_dir, zip_path, seed)
    options = dict(options or {}) if method == "intra_fusion" else {}
    if round_to != 1:
        options["round_to"] = round_to
    pruned_model, pruned, plans = ifjax.prune(
        model,
        folded,
        [all_groups[i] for i in indices],
        sparsity=sparsity,
        method=method,
        importance=importance,
        fold=False,
        gradients=gradients,
        key=jax.random.key(seed),
        **options,
    )
    if recalibrate:
        batches = recalibration_batches(
            name, recalibrate, data_dir=data_dir, zip_path=zip_path, seed=seed
        )
        pruned = ifjax.recalibrate_batchnorm(pruned_model, pruned, batches)
    step = dict(operation="prune", method=method, groups=indices, sparsity=sparsity)
    step |= dict(importance=importance, seed=seed, source=str(Path(checkpoint).absolute()))
    step |= {"recalibrate": recalibrate} if recalibrate else {}
    step |= options | {"converged": all(bool(p.converged) for p in plans)}
    path = save_model(
        out,
        pruned,
        model_spec=model_spec(pruned_model),
        history=[*restored.info["history"], step],
        metadata=restored.metadata,
        overwrite=overwrite,
    )
    summary = dict(checkpoint=str(path), groups=indices, history_entry=step)
    summary |= _size_change(variables, pruned)
    if evaluate:
        test_set = load_split(name, "test", data_dir=data_dir, zip_path=zip_path)
        for key, net, values in (("before", model, variables), ("after", pruned_model, pruned)):
            top1 = training.evaluate(net, values, _eval_batches(test_set)())["top1"]
            summary[f"top1_{key}"] = 100 * top1
    return summary


def _size_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Parameter counts, and the output widths of the layers that changed."""
    count = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree["params"]))
    widths = lambda tree: {
        "/".join(str(getattr(k, "key", k)) for k in path[:-1]): int(x.shape[-1])
        for path, x in jax.tree_util.tree_leaves_with_path(tree["params"])
        if getattr(path[-1], "key", None) == "kernel"
    }
    old, new = widths(before), widths(after)
    changed = {layer: (old[layer], new[layer]) for layer in old if old[layer] != new[layer]}
    return dict(params_before=count(before), params_after=count(after), widths_changed=changed)


def finetune(
    checkpoint: str | os.PathLike,
    *,
    workdir: str | os.PathLike,
    epochs: int,
    schedule: str = "finetune",
    batch_size: int = 128,
    seed: int = 0,
    dataset: str | None = None,
    data_dir: str | None = None,
    zip_path: str | None = None,
    train_subset: int | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    optimizer: str = "sgd",
    peak_lr: float | None = None,
    weight_decay: float | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, Any]:
    """Fine-tunes a (pruned) checkpoint; the result goes to ``workdir/model``.

    The checkpoint's history gets a ``{"operation": "finetune", ...}`` entry.
    """
    restored = restore(checkpoint)
    name = restored.dataset(dataset)
    train_set = load_split(
        name, "train", data_dir=data_dir, zip_path=zip_path, subset=train_subset, seed=seed
    )
    test_set = load_split(name, "test", data_dir=data_dir, zip_path=zip_path)
    options = dict(epochs=epochs, batch_size=batch_size, schedule=schedule, seed=seed)
    options |= _training_options(optimizer, peak_lr, weight_decay, label_smoothing)
    step = dict(operation="finetune", source=str(Path(checkpoint).absolute()), **options)
    return _fit_and_save(
        restored.model,
        restored.variables,
        train_set,
        test_set,
        options=options | {"max_steps": max_steps, "checkpoint_every": checkpoint_every},
        workdir=Path(workdir).absolute(),
        history=[*restored.info["history"], step],
        metadata=restored.metadata | {"dataset": name},
    )


def datafree(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    groups: str | Sequence[int] = "all",
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    importances: Sequence[str] = ("l1", "lamp", "taylor"),
    methods: Sequence[str] = ("default", "intra_fusion"),
    solver: str = "exact",
    epsilon: float = 1e-3,
    paper_lamp: bool | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    zip_path: str | None = None,
    test_subset: int | None = None,
    recalibrate: int = 0,
    seed: int = 0,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """The paper's data-free tables for a checkpoint (see :mod:`train.sweep`).

    ``paper_lamp=None`` scores "lamp" as the paper did (``lamp_released``) exactly when
    the paper's numbers for this model and dataset are available. ``recalibrate``:
    re-estimate every pruned model's BatchNorm statistics on that many training images
    (:func:`recalibration_batches`) before evaluating it; 0 (the default) stays
    data-free, as the paper.

    Writes ``out/datafree.csv``, ``out/datafree.md``, ``out/datafree.png`` (and
    ``out/datafree_gain.png`` next to the paper's gains). Finished cells go to the
    journal ``out/datafree.jsonl`` as they finish; with ``resume`` (the default) a sweep
    started again skips them, otherwise the journal is started afresh.

    Returns:
      ``{"rows", "table" (markdown), "paths", "paper" (bool), "agreement"}``.
    """
    restored = restore(checkpoint)
    name = restored.dataset(dataset)
    model_name = restored.metadata.get("model")
    paper = paper_lib.paper_datafree(model_name, name)
    paper_lamp = paper is not None if paper_lamp is None else paper_lamp
    test_set = load_split(name, "test", data_dir=data_dir, zip_path=zip_path, subset=test_subset)
    gradients = None
    if "taylor" in importances:
        all_groups = ifjax.discover_groups(
            restored.model, restored.variables, restored.example_input
        )
        folded = ifjax.fold_batchnorm(restored.variables, all_groups)
        gradients = _taylor(restored, folded, name, data_dir, zip_path, seed)
    if recalibrate < 0:
        raise ValueError(f"recalibrate is a number of images >= 0, got {recalibrate}")
    recalibration = None
    if recalibrate:
        recalibration = recalibration_batches(
            name, recalibrate, data_dir=data_dir, zip_path=zip_path, seed=seed
        )
    journal = Path(out) / "datafree.jsonl"
    if not resume:
        journal.unlink(missing_ok=True)
    rows = sweep.datafree_sweep(
        restored.model,
        restored.variables,
        sweep.eval_batch_list(test_set, EVAL_BATCH_SIZE),
        example_input=restored.example_input,
        groups=groups,
        sparsities=sparsities,
        importances=importances,
        methods=methods,
        solver=solver,
        epsilon=epsilon,
        paper_lamp=paper_lamp,
        gradients=gradients,
        recalibration_batches=recalibration,
        seed=seed,
        progress=progress,
        journal=journal,
    )
    label = dict(model=model_name or restored.model.__class__.__name__, dataset=name)
    rows = sweep.add_paper_columns([label | row for row in rows], paper)
    return _write_datafree(rows, Path(out), restored, paper is not None)


def _write_datafree(rows, out: Path, restored: Restored, has_paper: bool) -> dict[str, Any]:
    meta = restored.metadata
    title = (
        f"{meta.get('model', 'model')} x{meta.get('width_multiplier', 1)} on {rows[0]['dataset']}"
    )
    table = sweep.markdown_table(rows, title=f"Data-free pruning: {title}")
    if any(r["scoring"] != r["importance"] for r in rows):
        table += "\n'lamp' is scored as the paper did, with the released code's LAMP.\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "datafree.md").write_text(table)
    paths = {
        "csv": str(sweep.write_csv(rows, out / "datafree.csv")),
        "markdown": str(out / "datafree.md"),
        "plot": str(sweep.plot_datafree(rows, out / "datafree.png", title=title)),
    }
    if has_paper:
        paths["gain_plot"] = str(sweep.plot_gains(rows, out / "datafree_gain.png"))
    agreement = sweep.sign_agreement(rows)
    return dict(rows=rows, table=table, paths=paths, paper=has_paper, agreement=agreement)


def demo(
    workdir: str | os.PathLike = "runs/demo",
    *,
    data_dir: str | None = None,
    zip_path: str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Trains a small VGG11-BN on CIFAR-10 and runs the data-free sweep.

    Settings are :data:`DEMO` with ``overrides``. Training resumes (or is skipped when
    done) from ``workdir/train``; the sweep writes into ``workdir/datafree``.

    Returns:
      ``{"train": train summary, "datafree": datafree summary, "seconds": float}``.
    """
    start = time.perf_counter()
    unknown = sorted(set(overrides) - set(DEMO))
    if unknown:
        raise ValueError(f"unknown demo settings {unknown}; known: {sorted(DEMO)}")
    config = DEMO | overrides
    workdir = Path(workdir).absolute()
    trained = train(
        model=config["model"],
        dataset=config["dataset"],
        workdir=workdir / "train",
        width_multiplier=config["width_multiplier"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        schedule=config["schedule"],
        train_subset=config["train_subset"],
        data_dir=data_dir,
        zip_path=zip_path,
    )
    result = datafree(
        trained["checkpoint"],
        workdir / "datafree",
        groups=config["groups"],
        sparsities=config["sparsities"],
        importances=config["importances"],
        methods=config["methods"],
        solver=config["solver"],
        data_dir=data_dir,
        zip_path=zip_path,
        test_subset=config["test_subset"],
        progress=progress,
    )
    return dict(train=trained, datafree=result, seconds=time.perf_counter() - start)
