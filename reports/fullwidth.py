"""The paper at full width: VGG11-BN and ResNet18 trained on CIFAR-10, the data-free sweep
and Table 1, in resumable stages, on this CPU or on one GPU.

    python reports/reproduce.py fullwidth                       # CPU: VGG11-BN, resumable
    python reports/reproduce.py fullwidth --device-run prepare  # the folder for the GPU
    python reports/reproduce.py fullwidth --device-run unpack DIR   # what came back
    python reports/reproduce.py fullwidth --tiny                # everything, a few steps

Stages, run in the order given (each resumes; a stage cut short is simply run again):

* ``train``: the model at full width from scratch, batches gathered and augmented on the
  accelerator (:class:`train.data.DeviceBatches`), one-cycle schedule, SGD with Nesterov
  momentum, bfloat16 mixed precision on a GPU (:data:`RECIPES`); checkpoints every epoch
  (and every 100 steps on the CPU) through :func:`train.training.fit`.
* ``datafree``: every group x 10/30/50/70% x l1, lamp, taylor; Default, Intra-Fusion with
  the exact solver and with Sinkhorn (:func:`train.sweep.datafree_sweep`, journaled).
* ``table1``: all groups pruned at 40/60/70/80% (l1), Default vs Intra-Fusion, then a
  short fine-tune (journaled per row).
* ``bench``: a training step in images/s, ifjax vs PyTorch on the same device, both
  models at batch 128 and 512.
* ``replicas``: split-data training of k = 1, 2, 4 replicas on one device, each replica
  strategy of ``train_replicas`` against k separate runs (``bench/replicas.py``).
* ``report``: ``reports/fullwidth.md`` (and ``reports/gpu.md`` when GPU results exist),
  tables, CSVs and plots beside the paper's numbers.

On one GPU the stages run as device commands that return their results to ``--out``
(:func:`_export`: at most 8 files of at most 16 MiB); packaging them, planning what is
still to do there and unpacking what came back is ``reports/fullwidth_device.py``
(``--device-run prepare`` / ``unpack``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import math
import os
import platform
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "reports"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import reproduce  # noqa: E402  (reports/reproduce.py)

import ifjax  # noqa: E402
from models.registry import create_model, init_variables  # noqa: E402
from train import data as data_lib  # noqa: E402
from train import jobs, sweep, training  # noqa: E402

MODELS = ("vgg11_bn", "resnet18")
SPARSITIES = (0.1, 0.3, 0.5, 0.7)
IMPORTANCES = ("l1", "lamp", "taylor")
METHODS = ("default", "intra_fusion", "intra_fusion_sinkhorn")
TABLE1_SPARSITIES = (0.4, 0.6, 0.7, 0.8)
TABLE1_METHODS = ("default", "intra_fusion")
STAGES = ("bench", "train", "datafree", "table1", "replicas", "report")
# Where the runs live: their results (JSON, JSON lines, CSV) are tracked in git, since a
# machine may be wiped between sessions and the results are what the reports are written
# from; the weights and checkpoints there are ignored (.gitignore): they can be recomputed,
# and a device run returns the weights it trained.
RUNS = ROOT / "reports" / "runs" / "fullwidth"
REPORTS = ROOT / "reports"
FILE_LIMIT = 16 * 2**20  # one returned file
TOTAL_LIMIT = 64 * 2**20  # all returned files
MAX_FILES = 8
RESERVED = 2 * 2**20  # kept free for the log
WEIGHTS = "trained.npz"
RESTORED = "restored.json"  # beside results restored from a report (their own files lost)
RESULTS = "results.zip"
PAPER_BASE = {"vgg11_bn": (89.6, 90.2), "resnet18": (95.0, 95.2)}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the base models are trained, fine-tuned and evaluated on one kind of machine.

    Attributes:
      name: ``gpu``, ``cpu`` or ``tiny`` (the CI scale); it runs in RUNS/<name>.
      epochs: training epochs per model.
      batch_size: training batch.
      peak_lr: the one-cycle schedule's peak (``"fast"``: warm-up from peak/10 over 15%
        of the steps, then cosine to 0), SGD with Nesterov momentum 0.9, weight decay 5e-4.
      compute_dtype: mixed precision of the training step (None: float32).
      label_smoothing: label smoothing of the base models' training loss (0: none; Table
        1's fine-tuning uses none; reports/label_smoothing.md measures it).
      finetune_epochs: Table 1's fine-tuning (``"finetune"`` schedule: constant lr).
      finetune_lr: its learning rate (the paper's 0.01 at batch 128, scaled linearly).
      width: width multiplier (1.0: the paper's models).
      per_class: training/test images per class (None: all of CIFAR-10).
      max_steps: stop training after that many steps (tiny only).
      groups: the data-free sweep's groups ("all" or indices).
      bench_steps: timed steps per bench measurement.
      bench_batches: the bench's batch sizes (the replicas bench uses the first).
      sparsities: the data-free sweep's.
      table1_sparsities: Table 1's.
      replicas: the replica counts k of the replicas bench.
    """

    name: str
    epochs: Mapping[str, int]
    batch_size: int
    peak_lr: float
    compute_dtype: str | None
    finetune_epochs: int
    finetune_lr: float
    label_smoothing: float = 0.0
    width: float = 1.0
    per_class: int | None = None
    max_steps: int | None = None
    groups: str | tuple[int, ...] = "all"
    bench_steps: int = 30
    bench_batches: tuple[int, ...] = (128, 512)
    sparsities: tuple[float, ...] = SPARSITIES
    table1_sparsities: tuple[float, ...] = TABLE1_SPARSITIES
    replicas: tuple[int, ...] = (1, 2, 4)


RECIPES = {
    # One H100/H200: bfloat16 steps at batch 512 (peak lr 0.2, i.e. 0.05 per 128 images).
    # Measured on an H200 (2026-11-28): 30 VGG11-BN epochs in 26 s (87.93%), 15 ResNet18
    # epochs in 20 s (88.08%) with evaluation after each; hence longer runs now.
    "gpu": Recipe(
        name="gpu",
        epochs={"vgg11_bn": 60, "resnet18": 40},
        batch_size=512,
        peak_lr=0.2,
        compute_dtype="bfloat16",
        finetune_epochs=5,
        finetune_lr=0.04,
        bench_steps=100,
    ),
    # This 2-core CPU: float32 (XLA:CPU has no fast bfloat16 convolution), batch 128; a
    # full-width VGG11-BN epoch is ~5 min, so 30 epochs take ~2.5 h over resumed runs.
    "cpu": Recipe(
        name="cpu",
        epochs={"vgg11_bn": 30, "resnet18": 30},
        batch_size=128,
        peak_lr=0.05,
        compute_dtype=None,
        finetune_epochs=1,
        finetune_lr=0.01,
    ),
    # CI: the whole command on a 2-core CPU in about a minute (narrow models, 20 images
    # per class, a few steps, one group, short benches).
    "tiny": Recipe(
        name="tiny",
        epochs={"vgg11_bn": 1, "resnet18": 1},
        batch_size=32,
        peak_lr=0.05,
        compute_dtype=None,
        finetune_epochs=1,
        finetune_lr=0.01,
        width=0.125,
        per_class=20,
        max_steps=3,
        groups=(0,),
        bench_steps=2,
        bench_batches=(16,),
        sparsities=(0.5,),
        table1_sparsities=(0.4,),
        replicas=(2,),
    ),
}


# --------------------------------------------------------------------------- plumbing


class Deadline:
    """Seconds left before a run must have written its results (None: no deadline)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        """Whether a unit of work expected to take ``seconds`` still fits."""
        return self.left() > seconds


def _bench_module(name: str) -> Any:
    """``bench/<name>.py`` as module ``bench_<name>`` (``bench/models.py`` would otherwise
    shadow the ``models`` package)."""
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _say(message: str) -> None:
    print(f"[fullwidth {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


def _write_json(path: Path, data: Any) -> None:
    _write_atomically(path, (json.dumps(data, indent=1) + "\n").encode())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def machine() -> dict[str, Any]:
    """The device the stages ran on, named."""
    device = jax.devices()[0]
    return dict(
        platform=device.platform,
        device=getattr(device, "device_kind", str(device)),
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        jax=jax.__version__,
    )


def _flat(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        flat["/".join(str(k.key) for k in path)] = np.asarray(leaf)
    return flat


def _nested(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    return tree


def save_weights(path: Path, variables: Mapping[str, Any]) -> Path:
    """The variables as one flat ``.npz`` (``params/conv0/kernel`` keys), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.npz")
    np.savez(staging, **_flat(variables))
    os.replace(staging, path)
    return path


def load_weights(path: Path) -> dict[str, Any]:
    with np.load(path) as flat:
        variables = _nested({k: flat[k] for k in flat.files})
    ifjax.check_variables_finite(variables)
    return variables


def split_file(path: Path, out: Path, limit: int = FILE_LIMIT) -> list[Path]:
    """Copies ``path`` into ``out`` as ``<name>.part<i>`` pieces of at most ``limit`` bytes."""
    data = path.read_bytes()
    pieces = []
    for i, start in enumerate(range(0, max(len(data), 1), limit)):
        piece = out / f"{path.name}.part{i}"
        piece.write_bytes(data[start : start + limit])
        pieces.append(piece)
    return pieces


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    train: data_lib.ArrayDataset
    test: data_lib.ArrayDataset
    evals: list[dict[str, Any]]


def load_data(recipe: Recipe, path: str | os.PathLike | None) -> Data:
    """CIFAR-10 from the zip or its packed ``.npz``, without tfds."""
    start = time.perf_counter()
    splits = [
        data_lib.read_cifar10_zip(s, path, per_class=recipe.per_class) for s in ("train", "test")
    ]
    train_set, test_set = splits
    _say(
        f"data: {len(train_set)} train / {len(test_set)} test images from {train_set.source} "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return Data(train_set, test_set, sweep.eval_batch_list(test_set, min(500, len(test_set))))


# --------------------------------------------------------------------------- train


def _model(name: str, recipe: Recipe):
    return create_model(name, 10, recipe.width)


def _recorded_recipe(recipe: Recipe, epochs: int) -> dict[str, Any]:
    """The recipe as a model's ``train.json`` records it (label smoothing only when set, so
    that models trained before it existed still match)."""
    recorded = dataclasses.asdict(recipe) | {"epochs": epochs}
    if not recorded["label_smoothing"]:
        del recorded["label_smoothing"]
    return json.loads(json.dumps(recorded))


def set_aside(workdir: Path) -> Path | None:
    """Moves a model's results to ``<workdir>.<time>`` (kept, no longer reported); returns
    where, or None when there is nothing to move."""
    if not workdir.exists():
        return None
    aside = workdir.with_name(f"{workdir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    workdir.rename(aside)
    return aside


def train_stage(name: str, recipe: Recipe, data: Data, workdir: Path, epochs: int) -> dict:
    """Trains (or resumes, or finds trained) the base model; returns its summary.

    Results whose weights are gone with neither weights nor a checkpoint to resume from
    (a device run starts bare; this machine may be wiped between sessions) belong to a
    model that cannot be rebuilt: they are set aside (:func:`set_aside`) before training
    anew, so that no journal of theirs is resumed with other weights."""
    summary_path = workdir / "train.json"
    summary = _read_json(summary_path)
    wanted = _recorded_recipe(recipe, epochs)
    if summary is not None and (workdir / WEIGHTS).exists():
        if summary["recipe"] != wanted:
            raise ValueError(
                f"{workdir} holds {name} trained with another recipe ({summary['recipe']}); "
                "pass --runs with another folder (or move it) to train with this one"
            )
        _say(f"{name}: trained already ({summary['test_top1']:.2f}%)")
        return summary
    if summary is not None and not training._checkpoints(workdir / "train" / "checkpoints"):
        aside = set_aside(workdir)
        _say(f"{name}: its weights are gone; its results were set aside to {aside}")
    model = _model(name, recipe)
    variables = init_variables(model, 0, (1, 32, 32, 3))
    loader = data_lib.DeviceBatches(data.train, recipe.batch_size, seed=0)
    start = time.perf_counter()
    trained, history = training.fit(
        model,
        variables,
        train_batches=loader,
        eval_batches=lambda: data.evals,
        epochs=epochs,
        steps_per_epoch=loader.steps_per_epoch,
        optimizer_kind="fast",
        workdir=workdir / "train",
        seed=0,
        checkpoint_every_steps=100 if recipe.name == "cpu" else None,
        log_every=100,
        max_steps=recipe.max_steps,
        nesterov=True,
        peak_lr=recipe.peak_lr,
        compute_dtype=recipe.compute_dtype,
        label_smoothing=recipe.label_smoothing,
        progress_bar=False,
    )
    if len(history) < epochs and recipe.max_steps is None:
        raise RuntimeError(f"training of {name} stopped before the end; run again to resume")
    save_weights(workdir / WEIGHTS, trained)
    top1 = 100 * training.evaluate(model, trained, data.evals)["top1"]
    steps = loader.steps_per_epoch
    summary = dict(
        model=name,
        width=recipe.width,
        recipe=wanted,
        epochs_run=len(history),
        test_top1=top1,
        test_images=len(data.test),
        seconds_this_run=time.perf_counter() - start,
        train_seconds=sum(r["epoch_seconds"] for r in history),
        images_per_second=float(np.median([r["images_per_second"] for r in history]))
        if history
        else 0.0,
        steps_per_epoch=steps,
        history=history,
        machine=machine(),
    )
    _write_json(summary_path, summary)
    _say(f"{name}: trained {len(history)} epochs, test top-1 {top1:.2f}%")
    return summary


# --------------------------------------------------------------------------- data-free


DATAFREE_MACHINES = "datafree_machines.json"  # the machines of each importance's sweep
DATAFREE_CELL_S = 15  # seconds kept in hand before each cell under a deadline


def _record_machine(path: Path, importance: str) -> None:
    """Adds this machine to those that worked on ``importance``'s sweep (a sweep may be
    resumed on another machine)."""
    _write_json(path, _with_machine(_read_json(path) or {}, importance, machine()))


def _with_machine(machines: Mapping[str, list], importance: str, one: dict) -> dict:
    """``machines`` with ``one`` among ``importance``'s (once)."""
    known = machines.get(importance, [])
    return {**machines, importance: known if one in known else [*known, one]}


def datafree_stage(
    name: str, recipe: Recipe, data: Data, workdir: Path, deadline: Deadline, importances
) -> list[dict]:
    """The data-free sweep, one importance after another while the deadline allows."""
    model = _model(name, recipe)
    variables = load_weights(workdir / WEIGHTS)
    example = jnp.zeros((1, 32, 32, 3))
    groups = ifjax.discover_groups(model, variables, example)
    gradients = None
    rows: list[dict] = []
    for importance in importances:
        if not deadline.allows(30):
            _say(f"{name}: data-free {importance} left for the next run (deadline)")
            break
        if importance == "taylor" and gradients is None:
            folded = ifjax.fold_batchnorm(variables, groups)
            gradients = sweep.taylor_gradients(model, folded, data.train, seed=0)
        _record_machine(workdir / DATAFREE_MACHINES, importance)
        start = time.perf_counter()
        done = sweep.datafree_sweep(
            model,
            variables,
            data.evals,
            example_input=example,
            groups=recipe.groups,
            sparsities=recipe.sparsities,
            importances=(importance,),
            methods=METHODS,
            paper_lamp=True,
            gradients=gradients,
            progress=True,  # rate and ETA on stderr, one update per evaluation
            journal=workdir / f"datafree_{importance}.jsonl",
            stop_when=lambda: not deadline.allows(DATAFREE_CELL_S),
        )
        rows += done
        seconds = time.perf_counter() - start
        _say(f"{name}: data-free {importance}: {len(done)} evaluations ({seconds:.1f}s)")
    return rows


# --------------------------------------------------------------------------- Table 1


def _count(variables: Mapping[str, Any]) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))


def prune_all(
    model: Any, variables: Mapping[str, Any], sparsity: float, method: str, **options: Any
):
    """Table 1's pruning: every group at ``sparsity``, l1, BatchNorm folded (exact solver
    for Intra-Fusion; ``options`` of :func:`ifjax.intra_fusion`); returns ``(pruned model,
    pruned variables)``."""
    pruned_model, pruned, _ = ifjax.prune(
        model,
        variables,
        "all",
        sparsity=sparsity,
        method=method,
        importance="l1",
        example_input=jnp.zeros((1, 32, 32, 3)),
        **options,
    )
    return pruned_model, pruned


def table1_stage(
    name: str, recipe: Recipe, data: Data, workdir: Path, deadline: Deadline
) -> list[dict]:
    """All groups pruned (l1), Default vs Intra-Fusion, evaluated, then fine-tuned."""
    model = _model(name, recipe)
    variables = load_weights(workdir / WEIGHTS)
    journal = workdir / "table1.jsonl"
    done = reproduce.read_journal(journal)
    base = 100 * training.evaluate(model, variables, data.evals)["top1"]
    for sparsity in recipe.table1_sparsities:
        for method in TABLE1_METHODS:
            key = f"{method}@{sparsity}"
            if key in done:
                continue
            if not deadline.allows(45):
                _say(f"{name}: Table 1 {key} left for the next run (deadline)")
                return list(done.values())
            start = time.perf_counter()
            pruned_model, pruned = prune_all(model, variables, sparsity, method)
            prune_seconds = time.perf_counter() - start
            pruned_top1 = 100 * training.evaluate(pruned_model, pruned, data.evals)["top1"]
            loader = data_lib.DeviceBatches(data.train, recipe.batch_size, seed=1)
            start = time.perf_counter()
            tuned, history = training.fit(
                pruned_model,
                pruned,
                train_batches=loader,
                eval_batches=lambda: data.evals,
                epochs=recipe.finetune_epochs,
                steps_per_epoch=loader.steps_per_epoch,
                optimizer_kind="finetune",
                peak_lr=recipe.finetune_lr,
                nesterov=True,
                max_steps=recipe.max_steps,
                compute_dtype=recipe.compute_dtype,
                log_every=100,  # a line with rate and ETA (an epoch here is 390 steps)
                progress_bar=False,
            )
            row = dict(
                key=key,
                model=name,
                method=method,
                sparsity=sparsity,
                base_top1=base,
                pruned_top1=pruned_top1,
                finetuned_top1=100 * training.evaluate(pruned_model, tuned, data.evals)["top1"],
                finetune_epochs=recipe.finetune_epochs,
                params=_count(pruned),
                dense_params=_count(variables),
                prune_seconds=prune_seconds,
                finetune_seconds=time.perf_counter() - start,
            )
            reproduce.append_journal(journal, row)
            done[key] = row
            _say(
                f"{name}: Table 1 {key}: pruned {pruned_top1:.2f}%, fine-tuned "
                f"{row['finetuned_top1']:.2f}% ({row['params'] / row['dense_params']:.1%} kept)"
            )
    return list(done.values())


# --------------------------------------------------------------------------- benches


def _timed_rate(step, batch_size: int, steps: int, repeats: int = 3) -> list[float]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(steps)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates


def _ifjax_step(name: str, recipe: Recipe, batch_size: int):
    model = _model(name, recipe)
    # the training run's own optimizer (fit's cache), so that at the training batch the
    # step compiled here is the one training uses
    steps = data_lib.steps_per_epoch(50_000, recipe.batch_size, drop_remainder=True)
    optimizer = training._cached_optimizer(
        "fast", steps, recipe.epochs[name], 0.9, 5e-4, True, "sgd", recipe.peak_lr
    )
    state = training.create_train_state(model, init_variables(model, 0), optimizer)
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }
    )

    def run(steps: int) -> None:
        nonlocal state
        for _ in range(steps):
            state, _ = training.train_step(
                state, batch, model=model, optimizer=optimizer, compute_dtype=recipe.compute_dtype
            )
        jax.block_until_ready(state.params)

    return run


def _torch_step(name: str, recipe: Recipe, batch_size: int):
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    bench_models = _bench_module("models")
    constructor = {"vgg11_bn": bench_models.torch_vgg11_bn, "resnet18": bench_models.torch_resnet18}
    net = constructor[name]().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    mixed = recipe.compute_dtype == "bfloat16"

    def run(steps: int) -> None:
        net.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=mixed):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run, f"torch {torch.__version__} ({device}, eager, channels_last)"


def bench_stage(names: Sequence[str], recipe: Recipe, out: Path, deadline: Deadline) -> list:
    """A training step's images/s, ifjax vs PyTorch, at each of the recipe's batch sizes."""
    path = out / "bench.json"
    rows = _read_json(path) or []
    have = {(r["model"], r["batch_size"], r["framework"]) for r in rows}
    for name in names:
        for batch_size in recipe.bench_batches:
            for framework in ("ifjax", "torch"):
                if (name, batch_size, framework) in have or not deadline.allows(40):
                    continue
                start = time.perf_counter()
                try:
                    if framework == "ifjax":
                        run, label = (
                            _ifjax_step(name, recipe, batch_size),
                            f"ifjax, jax {jax.__version__}",
                        )
                    else:
                        run, label = _torch_step(name, recipe, batch_size)
                    run(1)
                    first = time.perf_counter() - start
                    run(3)
                    rates = _timed_rate(run, batch_size, recipe.bench_steps)
                except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                    _say(f"bench {name} {batch_size} {framework} failed: {error!r}")
                    rows.append(
                        dict(
                            model=name,
                            batch_size=batch_size,
                            framework=framework,
                            error=repr(error),
                        )
                    )
                    continue
                row = dict(
                    model=name,
                    batch_size=batch_size,
                    framework=framework,
                    implementation=label,
                    compute_dtype=recipe.compute_dtype or "float32",
                    first_step_seconds=first,
                    images_per_second=float(np.median(rates)),
                    rates=rates,
                    steps=recipe.bench_steps,
                    machine=machine(),
                )
                rows.append(row)
                _write_json(path, rows)
                rate = row["images_per_second"]
                _say(f"bench {name} batch {batch_size} {framework}: {rate:.0f} img/s")
    _write_json(path, rows)
    return rows


def replicas_stage(name: str, recipe: Recipe, out: Path, deadline: Deadline) -> list:
    """k = 1, 2, 4 replicas of ``name``: each replica strategy vs k separate runs."""
    bench_replicas = _bench_module("replicas")
    path = out / "replicas.json"
    rows = _read_json(path) or []
    have = {r["k"] for r in rows}
    model = _model(name, recipe)
    batch = recipe.bench_batches[0]
    args = argparse.Namespace(batch_size=batch, steps=recipe.bench_steps, repeats=2, devices=1)
    for k in recipe.replicas:
        if k in have or not deadline.allows(60):
            continue
        for row in bench_replicas._bench_k(model, k, args):
            row |= dict(
                model=name,
                width=recipe.width,
                batch_per_replica=batch,
                steps=args.steps,
                images_per_second=k * batch * args.steps / row["run"],
                machine=machine(),
            )
            rows.append(row)
            _say(f"replicas k={k} {row['mode']}: {row['images_per_second']:.0f} img/s")
        _write_json(path, rows)
    _write_json(path, rows)
    return rows


# --------------------------------------------------------------------------- running


def run_stages(
    recipe: Recipe,
    models: Sequence[str],
    stages: Sequence[str],
    *,
    data_path: str | os.PathLike | None = None,
    deadline_s: float | None = None,
    epochs: Mapping[str, int] | None = None,
    out: Path | None = None,
    runs: Path = RUNS,
    reports: Path = REPORTS,
    importances: Sequence[str] = IMPORTANCES,
    bench_models: Sequence[str] | None = None,
) -> Path:
    """Runs ``stages`` in the order given (each for every model in ``models``) under
    ``runs/<recipe>``; with ``out``, exports results and weights there after every stage
    (the device's returned files). A stage that ``deadline_s`` cuts short resumes on the
    next run."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or len(set(stages)) != len(stages):
        raise ValueError(f"stages must be distinct, from {STAGES}; got {list(stages)}")
    deadline = Deadline(deadline_s)
    root = runs / recipe.name
    root.mkdir(parents=True, exist_ok=True)
    _say(f"recipe {recipe.name}, models {list(models)}, stages {list(stages)} on {machine()}")
    data = None
    if {"train", "datafree", "table1"} & set(stages):
        data = load_data(recipe, data_path)
    epochs = {**recipe.epochs, **(epochs or {})}
    trained = lambda: [name for name in models if (root / name / WEIGHTS).exists()]
    for stage in stages:
        if stage == "bench":
            bench_stage(bench_models or models, recipe, root, deadline)
        elif stage == "train":
            for name in models:
                train_stage(name, recipe, data, root / name, epochs[name])
                _export(root, out, models)
        elif stage == "datafree":
            for name in trained():
                datafree_stage(name, recipe, data, root / name, deadline, importances)
                _export(root, out, models)
        elif stage == "table1":
            for name in trained():
                table1_stage(name, recipe, data, root / name, deadline)
                _export(root, out, models)
        elif stage == "replicas":
            replicas_stage(models[0], recipe, root, deadline)
        elif stage == "report":
            write_reports(runs, reports)
        # after every stage as well: a command that finds no weights (a fresh machine)
        # still returns its results.zip, which unpack expects
        _export(root, out, models)
    return root


def _export(root: Path, out: Path | None, models: Sequence[str]) -> None:
    """Copies the recipe's results (small files, one zip) and the weights (pieces of at
    most 16 MiB) of as many models as fit in what comes back (64 MiB, 8 files) to ``out``."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            hidden = relative.parts[-1].startswith(".") or "checkpoints" in relative.parts
            # the root's files (benches) and this run's models: on a machine kept warm
            # between commands, an earlier command's models are not sent back twice
            ours = len(relative.parts) == 1 or relative.parts[0] in models
            if (
                path.is_file()
                and ours
                and not hidden
                and path.suffix in (".json", ".jsonl", ".csv")
            ):
                archive.write(path, relative.as_posix())
    staging = out / f".{RESULTS}.tmp"
    staging.write_bytes(buffer.getvalue())
    os.replace(staging, out / RESULTS)
    for name in models:
        weights = root / name / WEIGHTS
        if not weights.exists() or (out / f"{name}.{WEIGHTS}.part0").exists():
            continue
        files = [p for p in out.iterdir() if p.is_file()]
        used = sum(p.stat().st_size for p in files) + RESERVED
        size = weights.stat().st_size
        if used + size > TOTAL_LIMIT or len(files) + 1 + -(-size // FILE_LIMIT) > MAX_FILES:
            _say(f"{name}: weights not exported, they do not fit in what comes back")
            continue
        for piece in split_file(weights, out, FILE_LIMIT):
            piece.rename(out / f"{name}.{piece.name}")


# --------------------------------------------------------------------------- reports


def _results(runs: Path) -> dict[str, Any]:
    """The newest results: per model the GPU's where present, else the CPU's."""
    found: dict[str, Any] = {"models": {}, "bench": [], "replicas": []}
    for recipe in ("cpu", "gpu", "tiny"):
        root = runs / recipe
        if not root.is_dir():
            continue
        found["bench"] = _read_json(root / "bench.json") or found["bench"]
        found["replicas"] = _read_json(root / "replicas.json") or found["replicas"]
        for name in MODELS:
            trained = _read_json(root / name / "train.json")
            if trained is None or (recipe == "tiny" and found["models"]):
                continue
            found["models"][name] = dict(
                recipe=recipe,
                train=trained,
                check=_read_json(root / name / "local_check.json"),
                datafree=[dict(r) for r in _datafree_rows(root / name)],
                datafree_machines=_read_json(root / name / DATAFREE_MACHINES) or {},
                table1=list(reproduce.read_journal(root / name / "table1.jsonl").values()),
                restored=_read_json(root / name / RESTORED),
            )
    found["cpu_runs"] = _cpu_runs(runs)
    return found


def _cpu_runs(runs: Path) -> dict[str, dict[str, Any]]:
    """This CPU's own runs (the ``cpu`` recipe), finished or under way: what they reached."""
    recipe = RECIPES["cpu"]
    found = {}
    for name in MODELS:
        workdir = runs / recipe.name / name
        if not (workdir / "train").is_dir() and not (workdir / "train.json").exists():
            continue
        checkpoints = training._checkpoints(workdir / "train" / "checkpoints")
        metrics = workdir / "train" / "metrics.jsonl"
        history = (
            [json.loads(line) for line in metrics.read_text().splitlines()]
            if metrics.exists()
            else []
        )
        found[name] = dict(
            train=_read_json(workdir / "train.json"),
            history=history,
            step=int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0,
            steps=recipe.epochs[name] * (50_000 // recipe.batch_size),
            datafree=_datafree_rows(workdir),
            table1=list(reproduce.read_journal(workdir / "table1.jsonl").values()),
            restored=_read_json(workdir / RESTORED),
        )
    return found


def _datafree_journals(workdir: Path) -> list[Path]:
    """The data-free sweep's journals, one per importance (each importance may run on
    another machine, whose base accuracy can differ in the last digit)."""
    return [
        workdir / f"datafree_{i}.jsonl"
        for i in IMPORTANCES
        if (workdir / f"datafree_{i}.jsonl").exists()
    ]


def _datafree_rows(workdir: Path) -> list[dict]:
    rows = []
    for journal in _datafree_journals(workdir):
        for line in journal.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "row" in record:
                rows.append(record["row"])
    return rows


def write_reports(runs: Path = RUNS, reports: Path = REPORTS) -> list[Path]:
    """``reports/fullwidth.md`` (+ CSVs, plots) and, with GPU benches, ``reports/gpu.md``."""
    import fullwidth_report

    found = _results(runs) | {"runs": runs, "reports": reports}
    written = []
    if found["models"]:
        written += fullwidth_report.write_fullwidth(found, reports)
    if found["bench"] or found["replicas"]:
        written.append(fullwidth_report.write_gpu(found, reports))
    for path in written:
        _say(f"wrote {path}")
    return written


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=tuple(RECIPES), help="default: gpu on a GPU, else cpu")
    parser.add_argument("--tiny", action="store_true", help="= --recipe tiny (CI scale)")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, help="default: GPU both, CPU vgg11_bn"
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        help="run in the order given (default: train datafree table1 report)",
    )
    parser.add_argument(
        "--bench-models", nargs="+", choices=MODELS, help="models of the bench stage"
    )
    parser.add_argument("--importances", nargs="+", choices=IMPORTANCES, default=list(IMPORTANCES))
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    parser.add_argument("--data", help="the zip or its packed .npz (default: ../shared/data zip)")
    parser.add_argument("--deadline-s", type=float, help="stop starting work after this long")
    parser.add_argument("--out", type=Path, help="export results and weights here (device runs)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where runs live")
    parser.add_argument("--reports", type=Path, default=REPORTS, help="where reports go")
    parser.add_argument(
        "--device-run",
        nargs="+",
        metavar=("prepare|unpack", "DIR"),
        help="prepare [DIR]: the folder for the GPU; unpack DIR: its results",
    )
    parser.add_argument("--no-wheels", action="store_true", help="prepare without the wheels")


def main(args: argparse.Namespace) -> int:
    gpu = jax.default_backend() == "gpu"
    recipe = RECIPES["tiny" if args.tiny else args.recipe or ("gpu" if gpu else "cpu")]
    models = args.models or (list(MODELS) if recipe.name != "cpu" else ["vgg11_bn"])
    stages = args.stages or ["train", "datafree", "table1", "report"]
    if "bench" not in stages:  # the bench's first step is to include its compilation
        jobs.enable_compilation_cache(jobs.default_compilation_cache())
    epochs = {m: args.epochs for m in models} if args.epochs else None
    run_stages(
        recipe,
        models,
        stages,
        data_path=args.data,
        deadline_s=args.deadline_s,
        epochs=epochs,
        out=args.out,
        runs=args.runs,
        reports=args.reports,
        importances=args.importances,
        bench_models=args.bench_models,
    )
    return 0
