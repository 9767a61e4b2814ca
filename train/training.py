"""Training and fine-tuning with optax: schedules, SGD, jitted steps, evaluation and ``fit``.

Recipes (``kind``):

* ``"base"``: the paper's base training, lr ``0.05 * 0.5 ** floor(epoch / 30)``.
* ``"finetune"``: the paper's fine-tuning after pruning, lr ``0.01 * 0.5 ** floor(epoch / 30)``.
* ``"fast"``: for short runs, a linear warmup from 0.01 to a peak of 0.1 over the first 15%
  of the steps, then cosine decay to 0 at the last step. This is the usual one-cycle-style
  recipe for short CIFAR runs (SGD momentum 0.9, weight decay 5e-4, batch 128): the whole
  budget is spent in one warmup-decay cycle instead of step decays every 30 epochs. It has
  not yet been tuned on CIFAR-10 in this repository.

The optimizer is SGD with momentum and *coupled* L2 weight decay, as ``torch.optim.SGD``
(``weight_decay``) in the PyTorch CIFAR scripts of the reference: ``weight_decay * param``
is added to the gradient of every parameter (kernels, biases and BatchNorm scales alike,
as the reference does) before momentum. ``optimizer="adamw"`` uses AdamW (decoupled
weight decay) instead, the usual optimizer of vision transformers, with the same
schedule shapes; ``peak_lr`` then replaces the schedule's peak (SGD's 0.1 is far too
large for Adam: ViTs train with about 1e-3).

One loop trains everything: :class:`TrainLoop` run by :func:`run_loop`, built by ``fit``
for one model and by :func:`train.split.train_replicas` for k replicas. It checkpoints
the whole training state (params, batch_stats, opt_state, step, rng, epoch and position
inside the epoch, running train metrics and the metrics history; replicas stacked on a
leading axis) into ``workdir/checkpoints/step_<N>/`` with
:func:`ifjax.checkpoint.save_pytree` (Orbax, atomic), keeping the last two, and resumes
the same run from the newest one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from ifjax.checkpoint import restore_pytree, save_pytree
from models.layers import inference_jit

__all__ = [
    "KEEP_CHECKPOINTS",
    "METRIC_COLUMNS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainLoop",
    "TrainState",
    "check_label_smoothing",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "evaluate",
    "eval_throughput",
    "evaluate_with",
    "fit",
    "learning_rate_schedule",
    "make_optimizer",
    "optimizer_config",
    "run_loop",
    "sync_processes",
    "to_host",
    "train_step",
]

Batch = Mapping[str, Any]
SCHEDULES = ("base", "finetune", "fast")
OPTIMIZERS = ("sgd", "adamw")
KEEP_CHECKPOINTS = 2
METRIC_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "test_top1",
    "test_loss",
    "epoch_seconds",
    "images_per_second",
)
_STEP_DECAY_PEAK = {"base": 0.05, "finetune": 0.01}
_STEP_DECAY_EPOCHS = 30
_FAST_PEAK = 0.1
_FAST_WARMUP_FRACTION = 0.15


def learning_rate_schedule(
    kind: str, steps_per_epoch: int, epochs: int, peak_lr: float | None = None
) -> optax.Schedule:
    """Returns the learning rate as a function of the optimizer step.

    Args:
      kind: ``"base"``, ``"finetune"`` or ``"fast"`` (see the module docstring).
      steps_per_epoch: optimizer steps per epoch.
      epochs: length of the run (used by ``"fast"``, checked for all).
      peak_lr: replaces the schedule's peak learning rate (the rest scales with it).

    Example:
      >>> schedule = learning_rate_schedule("base", steps_per_epoch=391, epochs=300)
      >>> round(float(schedule(30 * 391)), 6)
      0.025
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(
            f"need steps_per_epoch >= 1 and epochs >= 1, got {steps_per_epoch}, {epochs}"
        )
    if kind in _STEP_DECAY_PEAK:
        peak = _STEP_DECAY_PEAK[kind] if peak_lr is None else peak_lr

        def step_decay(count: jax.Array) -> jax.Array:
            halvings = jnp.asarray(count) // steps_per_epoch // _STEP_DECAY_EPOCHS
            return peak * jnp.power(jnp.float32(0.5), halvings.astype(jnp.float32))

        return step_decay
    if kind == "fast":
        peak = _FAST_PEAK if peak_lr is None else peak_lr
        total = epochs * steps_per_epoch
        warmup = max(1, round(_FAST_WARMUP_FRACTION * total))
        return optax.warmup_cosine_decay_schedule(
            init_value=peak / 10,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(total, warmup + 1),
            end_value=0.0,
        )
    raise ValueError(f"unknown schedule {kind!r}; known: {SCHEDULES}")


def make_optimizer(
    kind: str,
    steps_per_epoch: int,
    epochs: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    optimizer: str = "sgd",
    peak_lr: float | None = None,
) -> optax.GradientTransformation:
    """SGD with momentum and coupled L2 weight decay on all parameters (as torch SGD), or
    AdamW.

    Args:
      kind: learning-rate schedule, see :func:`learning_rate_schedule`.
      steps_per_epoch: optimizer steps per epoch.
      epochs: length of the run.
      momentum: SGD momentum (AdamW: its first-moment decay b1).
      weight_decay: SGD: L2 coefficient added to the gradient, ``grad + weight_decay *
        param``; AdamW: the decoupled decay ``lr * weight_decay * param``.
      nesterov: Nesterov momentum (SGD only).
      optimizer: ``"sgd"`` or ``"adamw"``.
      peak_lr: the schedule's peak learning rate (default: the schedule's own).

    Example:
      >>> optimizer = make_optimizer("finetune", steps_per_epoch=391, epochs=100)
      >>> opt_state = optimizer.init(variables["params"])
    """
    schedule = learning_rate_schedule(kind, steps_per_epoch, epochs, peak_lr)
    if optimizer == "adamw":
        if nesterov:
            raise ValueError("nesterov applies to optimizer='sgd' only")
        return optax.adamw(schedule, b1=momentum, weight_decay=weight_decay)
    if optimizer != "sgd":
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {OPTIMIZERS}")
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )


# The same optimizer object for the same settings, so that the jitted train_step (static in
# the optimizer) is reused, not recompiled, by every fit with those settings.
_cached_optimizer = functools.lru_cache(maxsize=16)(make_optimizer)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; the model and optimizer stay static.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (BatchNorm running statistics).
      opt_state: the optimizer state.
      rng: uint32 (2,) key data; step ``i`` uses ``fold_in(rng, i)`` (e.g. for dropout).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """The model variables ``{"params": ..., "batch_stats": ...}``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def _architecture(model: nn.Module) -> dict[str, Any]:
    as_tuples = lambda v: tuple(map(as_tuples, v)) if isinstance(v, (list, tuple)) else v
    names = [f.name for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
    return {name: as_tuples(getattr(model, name)) for name in names}


def create_train_state(
    model: nn.Module,
    variables: Mapping[str, Any],
    optimizer: optax.GradientTransformation,
    *,
    seed: int = 0,
) -> TrainState:
    """Creates the training state of a model from its variables.

    Args:
      model: the model of ``variables``; if it has ``for_variables`` (the models in
        ``models/``), its widths are checked against the variables' shapes.
      variables: ``{"params": ..., "batch_stats": ...}`` (dense or pruned).
      optimizer: e.g. :func:`make_optimizer`.
      seed: seed of the state's random key.

    Example:
      >>> state = create_train_state(model, variables, make_optimizer("base", 391, 300))
    """
    if hasattr(model, "for_variables"):
        implied = model.for_variables(variables)
        if _architecture(implied) != _architecture(model):
            raise ValueError(
                f"variables do not match the model: their shapes imply {implied}, got {model}; "
                "use model.for_variables(variables)"
            )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def check_label_smoothing(label_smoothing: float) -> float:
    """``label_smoothing`` as a float, or a ValueError unless it is in [0, 1)."""
    value = float(label_smoothing)
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    return value


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy of ``logits`` (..., C) against integer ``labels``.

    With ``label_smoothing`` s > 0 the target is ``(1 - s) * one_hot(label) + s / C``
    (:func:`optax.smooth_labels`); s = 0 is plain cross-entropy, computed from the integer
    labels as before.

    Example:
      >>> cross_entropy(logits, batch["label"], 0.1).mean()
    """
    label_smoothing = check_label_smoothing(label_smoothing)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))


@functools.partial(
    jax.jit, static_argnames=("model", "optimizer", "compute_dtype", "label_smoothing")
)
def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    compute_dtype: str | None = None,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch, BatchNorm in train mode (jitted once per shape).

    Args:
      state: the training state.
      batch: ``{"image": float32 (B, H, W, 3), "label": int32 (B,)}``.
      model: the Linen model (static).
      optimizer: the optax optimizer the state was created with (static).
      compute_dtype: mixed precision, e.g. ``"bfloat16"``: the forward and backward pass
        run on parameters and images cast to it (BatchNorm statistics, the loss, the
        gradients and the update stay float32). None: float32 throughout.
      label_smoothing: the loss's targets put ``1 - label_smoothing`` on the label and
        spread ``label_smoothing`` evenly over all classes (0: plain cross-entropy).

    Returns:
      The new state and ``{"loss": mean cross-entropy (against the smoothed targets),
      "accuracy": top-1}`` of the batch (before the update).

    Example:
      >>> state, metrics = train_step(state, batch, model=model, optimizer=optimizer)
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        images = batch["image"]
        if compute_dtype is not None:
            params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
            images = images.astype(compute_dtype)
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        logits = logits.astype(jnp.float32)
        return cross_entropy(logits, batch["label"], label_smoothing).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    steps, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, steps),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
    return new_state, {"loss": loss, "accuracy": accuracy}


@inference_jit(static_argnames=("model",))
def eval_step(
    variables: Mapping[str, Any], batch: Batch, *, model: nn.Module
) -> dict[str, jax.Array]:
    """Evaluates a batch, BatchNorm in inference mode (jitted once per shape).

    On XLA:CPU it is compiled with :data:`models.layers.XLA_CPU_INFERENCE_OPTIONS`
    (:class:`models.layers.InferenceJit`), which evaluate ResNet18 faster than the
    training options.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}``.
      batch: ``{"image": (B, H, W, 3), "label": int32 (B,)}`` and optionally
        ``"mask"``: bool (B,), False for padding rows, which then count for nothing.

    Returns:
      ``loss`` and ``accuracy`` (means over valid rows), ``loss_sum``, ``correct`` and
      ``count`` (sums over valid rows).

    Example:
      >>> eval_step(variables, batch, model=model)["accuracy"]
    """
    logits = model.apply(variables, batch["image"], train=False)
    labels = batch["label"]
    mask = batch["mask"] if "mask" in batch else jnp.ones(labels.shape, bool)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss_sum = jnp.sum(jnp.where(mask, losses, 0.0))
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask)
    count = jnp.sum(mask)
    denominator = jnp.maximum(count, 1)
    return {
        "loss": loss_sum / denominator,
        "accuracy": correct / denominator,
        "loss_sum": loss_sum,
        "correct": correct,
        "count": count,
    }


def to_host(tree: Any) -> Any:
    """The whole of a (possibly multi-host sharded) tree on this host, as numpy.

    Every process must call it with the same tree: arrays spread over several processes
    are gathered with ``multihost_utils.process_allgather``.
    """
    leaves = jax.tree.leaves(tree)
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def sync_processes(name: str) -> None:
    """Waits until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _fixed_size_batches(batches: Iterable[Batch]) -> Iterator[dict[str, Any]]:
    """Cuts batches to the first batch's size and pads the last with masked rows."""
    size = None
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        size = size or len(labels)
        if len(labels) == size:  # The common case: passed through as is (no host copy).
            yield {"image": images, "label": labels, "mask": np.ones(size, bool)}
            continue
        for start in range(0, len(labels), size):
            image = np.asarray(images[start : start + size])
            label = np.asarray(labels[start : start + size])
            valid = len(label)
            image = np.pad(image, [(0, size - valid)] + [(0, 0)] * (image.ndim - 1))
            label = np.pad(label, (0, size - valid))
            yield {"image": image, "label": label, "mask": np.arange(size) < valid}


def evaluate(
    model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Batch]
) -> dict[str, Any]:
    """Sample-weighted top-1 accuracy and mean loss over all examples of ``batches``.

    Every batch is cut to the size of the first one and a smaller last batch is padded
    with masked rows, so :func:`eval_step` compiles once.

    Args:
      model: the Linen model of ``variables``.
      variables: ``{"params": ..., "batch_stats": ...}``.
      batches: iterable of ``{"image", "label"}`` batches.

    Returns:
      ``{"top1": float in [0, 1], "loss": float, "count": int}``.

    Example:
      >>> evaluate(model, variables, test_batches())["top1"]
      0.9123
    """
    return evaluate_with(functools.partial(eval_step, model=model), variables, batches)[0]


def evaluate_with(step: Callable, variables: Any, batches: Iterable[Batch]) -> list[dict[str, Any]]:
    """The evaluation loop of :func:`evaluate`, for any step with :func:`eval_step`'s
    outputs: one model (scalars) or k stacked replicas ((k,) arrays, e.g. vmapped).

    Returns:
      One ``{"top1", "loss", "count"}`` per model.
    """
    totals = None
    for batch in _fixed_size_batches(batches):
        out = step(variables, batch)
        sums = (out["loss_sum"], out["correct"], out["count"])
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluate got no batches")
    loss_sum, correct, count = (np.atleast_1d(np.asarray(x)) for x in to_host(totals))
    if np.any(count == 0):
        raise ValueError("evaluate got no examples")
    return [
        {"top1": float(c) / int(n), "loss": float(s) / int(n), "count": int(n)}
        for s, c, n in zip(loss_sum, correct, count, strict=True)
    ]


def eval_throughput(
    model: nn.Module, variables: Mapping[str, Any], batch, repeats: int = 5
) -> float:
    """Evaluation images per second of one jitted forward pass of ``model`` on ``batch``
    (an image array), best of ``repeats`` timed runs after one compiling run."""
    forward = jax.jit(lambda v, x: model.apply(v, x))
    forward(variables, batch).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        forward(variables, batch).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return batch.shape[0] / best


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class TrainLoop:
    """How one training run (one model, or k replicas at once) steps, reads, evaluates
    and stores its state; :func:`run_loop` runs it.

    :func:`fit` (one model) and :func:`train.split.train_replicas` (k replicas, one
    :class:`TrainState` each, stepped by a replica strategy) both build one, so the two
    share one loop, one checkpoint layout, one resume path and one evaluation step.

    Attributes:
      step: ``(state, batch) -> (state, {"loss", "accuracy"})``; with replicas the
        metrics have shape (k,).
      train_batches: ``(epoch, start_step) -> iterable`` of the epoch's batches from
        step ``start_step`` on; a batch's ``"label"`` is (B,) or, with replicas, (k, B).
      evaluate: ``state -> [{"top1", "loss"}, ...]``, one dict per model.
      stored: ``state -> TrainState`` on this host (numpy; replicas stacked on a leading
        axis), what a checkpoint holds. Called by every process.
      restored: ``(state, stored TrainState) -> state``, the inverse of ``stored`` (the
        first argument gives the layout, e.g. the device placement).
      schedule: the learning rate per step (recorded per epoch).
      epochs, steps_per_epoch: the run's length.
      config: what identifies the run; a checkpoint of another config is refused.
      workdir: where ``metrics.jsonl``, ``metrics.csv`` and ``checkpoints/step_<N>/`` go
        (None: nothing is written).
      checkpoint_every_steps: also checkpoint every that many steps (besides each epoch).
      max_steps: stop (and checkpoint) once this many steps are done.
      replicas: None for one model (scalar metrics), else k (per-replica lists).
    """

    step: Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]]
    train_batches: Callable[[int, int], Iterable[Batch]]
    evaluate: Callable[[Any], list[dict[str, float]]]
    stored: Callable[[Any], TrainState]
    restored: Callable[[Any, TrainState], Any]
    schedule: optax.Schedule
    epochs: int
    steps_per_epoch: int
    config: dict[str, Any]
    workdir: Path | None = None
    checkpoint_every_steps: int | None = None
    max_steps: int | None = None
    replicas: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(
                f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}"
            )
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError(
                f"need epochs >= 1 and steps_per_epoch >= 1, got {self.epochs}, "
                f"{self.steps_per_epoch}"
            )


@dataclasses.dataclass
class _Run:
    """Where a run is: the state, the epoch, the position in it and what was measured.

    ``sums`` holds (loss * B, correct, B) of the epoch so far per model, float64 on the
    host; ``pending`` the metrics of the steps not yet added to them (on the device, so
    that a step never waits for the previous one).
    """

    state: Any
    sums: np.ndarray
    step: int = 0  # steps taken, kept on the host to avoid a sync per step
    epoch: int = 0
    step_in_epoch: int = 0
    pending: list[tuple[dict[str, jax.Array], int]] = dataclasses.field(default_factory=list)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    saved_step: int = -1
    restored_epochs: int = 0

    def settle(self) -> np.ndarray:
        """Adds the pending steps' metrics to ``sums`` (in step order) and returns them."""
        if self.pending:
            metrics = to_host([m for m, _ in self.pending])
            for values, (_, size) in zip(metrics, self.pending, strict=True):
                loss = np.asarray(values["loss"], np.float64)
                accuracy = np.asarray(values["accuracy"], np.float64)
                self.sums += np.stack([loss * size, accuracy * size, np.full_like(loss, size)], -1)
            self.pending = []
        return self.sums


def _per_model(values: np.ndarray, loop: TrainLoop) -> Any:
    """A float for one model, a list of floats for replicas."""
    return float(values) if loop.replicas is None else [float(v) for v in values]


def _format(value: Any) -> str:
    if isinstance(value, list):
        return "[" + " ".join(map(_format, value)) + "]"
    return "-" if value is None else f"{value:.4f}"


def _train_means(run: _Run, loop: TrainLoop) -> tuple[Any, Any]:
    loss_sum, correct, seen = np.moveaxis(run.settle(), -1, 0)
    seen = np.maximum(seen, 1)
    return _per_model(loss_sum / seen, loop), _per_model(correct / seen, loop)


class _Progress:
    """A tqdm bar on a terminal; otherwise a line every ``log_every`` steps, with rate and
    ETA; ``log=None`` writes nothing."""

    def __init__(
        self,
        total: int,
        initial: int,
        log_every: int | None,
        bar: bool | None,
        log: Callable[[str], None] | None = print,
    ):
        self.log = log
        self.interactive = log is not None and (sys.stdout.isatty() if bar is None else bar)
        self.total, self.initial = total, initial
        self.log_every = log_every if log is not None else None
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            file=sys.stdout,
            dynamic_ncols=True,
            disable=not self.interactive,
        )

    def step(self, run: _Run, loop: TrainLoop) -> None:
        self.bar.update(1)
        if not self.log_every or run.step % self.log_every:
            return
        loss, accuracy = _train_means(run, loop)
        if self.interactive:
            self.bar.set_postfix(epoch=run.epoch + 1, loss=_format(loss), acc=_format(accuracy))
            return
        elapsed = time.perf_counter() - self.start
        rate = (run.step - self.initial) / max(elapsed, 1e-9)
        eta = tqdm.format_interval((self.total - run.step) / rate) if rate else "?"
        self.write(
            f"epoch {run.epoch + 1} step {run.step}/{self.total} loss {_format(loss)} "
            f"acc {_format(accuracy)} | {rate:.2f} step/s, elapsed "
            f"{tqdm.format_interval(elapsed)}, ETA {eta}"
        )

    def write(self, line: str) -> None:
        if self.interactive:
            self.bar.write(line, file=sys.stdout)
        elif self.log is print:
            print(line, flush=True)
        elif self.log is not None:
            self.log(line)

    def close(self) -> None:
        self.bar.close()


_LEGACY_CHECKPOINT = re.compile(r"epoch_\d+")


def _checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories ``step_<N>`` (hidden temporaries excluded), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if re.fullmatch(r"step_\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(run: _Run, loop: TrainLoop) -> None:
    """Saves the state (process 0 writes; every process takes part) and keeps the newest
    ``KEEP_CHECKPOINTS``."""
    tree = flax.serialization.to_state_dict(loop.stored(run.state))
    sums = run.settle()
    if jax.process_index() == 0:
        directory = loop.workdir / "checkpoints"
        metadata = {
            "kind": "train_state",
            "config": loop.config,
            "epoch": run.epoch,
            "step_in_epoch": run.step_in_epoch,
            "train_sums": sums.tolist(),
            "history": run.history,
        }
        save_pytree(directory / f"step_{run.step:09d}", tree, metadata=metadata, overwrite=True)
        for old in _checkpoints(directory)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    sync_processes("ifjax_train_checkpoint")
    run.saved_step = run.step


def _check_matches(path: Path, restored: Mapping[str, Any], template: Mapping[str, Any]) -> None:
    """Raises a ValueError when restored arrays differ in structure or shape from the model's."""
    got = flax.traverse_util.flatten_dict(restored, sep="/")
    want = flax.traverse_util.flatten_dict(template, sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(
            f"checkpoint {path} does not match this model/optimizer: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, value in want.items():
        if np.shape(got[key]) != np.shape(value) or got[key].dtype != jnp.asarray(value).dtype:
            raise ValueError(
                f"checkpoint {path} does not match this model: {key} has shape "
                f"{np.shape(got[key])} {got[key].dtype} in the checkpoint, "
                f"{np.shape(value)} {jnp.asarray(value).dtype} in the model"
            )


def check_checkpoint_identity(
    path: Path,
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    kind: str,
    what: str,
    owner: str,
    fix: str,
) -> None:
    """Raises a ValueError unless a training checkpoint is of ``kind`` and ``config``.

    ``config`` is compared as it was stored (through JSON). For the messages: ``what``
    names the checkpoint kind, ``owner`` the run it belongs to, ``fix`` how to start over.
    """
    if info.get("kind") != kind:
        raise ValueError(f"{path} is not a {what} checkpoint")
    if info["config"] != json.loads(json.dumps(config)):
        raise ValueError(
            f"checkpoint {path} belongs to a {owner} {info['config']}, this one has {config}; {fix}"
        )


def _restore_checkpoint(path: Path, run: _Run, loop: TrainLoop) -> _Run:
    tree, info = restore_pytree(path)
    check_checkpoint_identity(
        path,
        info,
        loop.config,
        kind="train_state",
        what="training",
        owner="run with config",
        fix="use another workdir to start a new run",
    )
    template = loop.stored(run.state)
    _check_matches(path, tree, flax.serialization.to_state_dict(template))
    stored = flax.serialization.from_state_dict(template, tree)
    step = int(np.asarray(stored.step).reshape(-1)[0])
    return _Run(
        state=loop.restored(run.state, stored),
        sums=np.asarray(info["train_sums"], np.float64).reshape(run.sums.shape),
        step=step,
        epoch=info["epoch"],
        step_in_epoch=info["step_in_epoch"],
        history=list(info["history"]),
        saved_step=step,
        restored_epochs=len(info["history"]),
    )


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _csv_columns(record: Mapping[str, Any]) -> list[tuple[str, str, int | None]]:
    """(header, key, replica) per CSV column: a list-valued metric gets one per replica."""
    columns = []
    for key in METRIC_COLUMNS:
        value = record[key]
        if isinstance(value, list):
            columns += [(f"{key}_{r}", key, r) for r in range(len(value))]
        else:
            columns.append((key, key, None))
    return columns


def _write_metrics(workdir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrites ``metrics.jsonl`` and ``metrics.csv`` from the whole history (process 0)."""
    if jax.process_index() != 0:
        return
    _write_atomically(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    columns = _csv_columns(history[0]) if history else [(c, c, None) for c in METRIC_COLUMNS]
    cell = lambda record, key, r: str(record[key] if r is None else record[key][r])
    lines = [",".join(header for header, _, _ in columns)]
    lines += [",".join(cell(record, k, r) for _, k, r in columns) for record in history]
    _write_atomically(workdir / "metrics.csv", "\n".join(lines) + "\n")


def _batch_size(batch: Batch) -> int:
    return int(np.shape(batch["label"])[-1])


def _train_epoch(run: _Run, loop: TrainLoop, progress: _Progress) -> tuple[bool, float, int]:
    """Trains the rest of the current epoch; returns (stopped at max_steps, seconds, images)."""
    start, images = time.perf_counter(), 0
    batches = iter(loop.train_batches(run.epoch, run.step_in_epoch))
    every = loop.checkpoint_every_steps if loop.workdir is not None else None
    try:
        while run.step_in_epoch < loop.steps_per_epoch:
            if loop.max_steps is not None and run.step >= loop.max_steps:
                return True, time.perf_counter() - start, images
            batch = next(batches, None)
            if batch is None:  # The loader's epoch is shorter than steps_per_epoch.
                break
            run.state, metrics = loop.step(run.state, batch)
            run.pending.append((metrics, _batch_size(batch)))
            images += _batch_size(batch)
            run.step, run.step_in_epoch = run.step + 1, run.step_in_epoch + 1
            progress.step(run, loop)
            if every and run.step % every == 0 and run.step_in_epoch < loop.steps_per_epoch:
                _save_checkpoint(run, loop)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    run.settle()
    jax.block_until_ready(run.state)
    return False, time.perf_counter() - start, images


def _finish_epoch(run: _Run, loop: TrainLoop, progress: _Progress, seconds: float, images: int):
    """Evaluates, records the epoch's metrics, writes them and checkpoints."""
    if not np.all(run.settle()[..., 2] > 0):
        raise ValueError(f"train_batches yielded no batch for epoch {run.epoch}")
    train_loss, train_acc = _train_means(run, loop)
    eval_start = time.perf_counter()
    scores = loop.evaluate(run.state)
    test = {key: [s[key] for s in scores] for key in ("top1", "loss")}
    if loop.replicas is None:
        test = {key: values[0] for key, values in test.items()}
    record = {
        "epoch": run.epoch + 1,
        "step": run.step,
        "lr": float(loop.schedule(run.step - run.step_in_epoch)),
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_top1": test["top1"],
        "test_loss": test["loss"],
        "epoch_seconds": seconds + time.perf_counter() - eval_start,
        "images_per_second": images / seconds if seconds > 0 else 0.0,
    }
    run.history.append(record)
    run.epoch, run.step_in_epoch, run.sums = run.epoch + 1, 0, np.zeros_like(run.sums)
    progress.write(
        f"epoch {record['epoch']}/{loop.epochs}: train loss {_format(train_loss)} "
        f"acc {_format(train_acc)} | test top1 {_format(record['test_top1'])} "
        f"loss {_format(record['test_loss'])} | {record['epoch_seconds']:.1f}s, "
        f"{record['images_per_second']:.0f} img/s"
    )
    if loop.workdir is not None:
        _write_metrics(loop.workdir, run.history)
        _save_checkpoint(run, loop)


def _resume(loop: TrainLoop, run: _Run, progress_log) -> _Run:
    """Resumes from the newest checkpoint in the workdir, if any."""
    if loop.workdir is None:
        return run
    loop.workdir.mkdir(parents=True, exist_ok=True)
    found = _checkpoints(loop.workdir / "checkpoints")
    legacy = [p for p in loop.workdir.iterdir() if _LEGACY_CHECKPOINT.fullmatch(p.name)]
    if not found and legacy:
        raise ValueError(
            f"{loop.workdir} holds replica checkpoints of an older ifjax ({legacy[0].name}, "
            "one per epoch), which this version does not resume; remove them to start over"
        )
    if found:
        run = _restore_checkpoint(found[-1], run, loop)
        if progress_log is not None:
            where = (
                f"all {loop.epochs} epochs done"
                if run.epoch >= loop.epochs
                else f"epoch {run.epoch + 1}, {run.step_in_epoch} of its steps done"
            )
            progress_log(f"resumed at step {run.step} ({where}) from {found[-1]}")
    _write_metrics(loop.workdir, run.history)
    return run


def run_loop(
    loop: TrainLoop,
    state: Any,
    *,
    log_every: int | None = 50,
    progress_bar: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[Any, list[dict[str, Any]], int]:
    """Runs a :class:`TrainLoop` from ``state``, or from the newest checkpoint in its
    workdir, to its end (or ``max_steps``), evaluating after every epoch.

    A resumed run equals the uninterrupted one: batches depend only on (epoch, step),
    the training key is folded with the step, and the running train metrics are stored
    with the state.

    Args:
      loop: what to run.
      state: the initial state (when resuming it gives the layout only).
      log_every: steps between progress updates (None or 0: none).
      progress_bar: tqdm bar (True) or plain lines (False); None: bar on a terminal.
      log: where lines go (default ``print``; None: nowhere).

    Returns:
      ``(state, history, restored_epochs)``: the final state, one record per epoch
      (``METRIC_COLUMNS``) and how many of the records came from a checkpoint.
    """
    sums = np.zeros((3,) if loop.replicas is None else (loop.replicas, 3), np.float64)
    run = _resume(loop, _Run(state=state, sums=sums), log)
    progress = _Progress(loop.epochs * loop.steps_per_epoch, run.step, log_every, progress_bar, log)
    try:
        while run.epoch < loop.epochs:
            stopped, seconds, images = _train_epoch(run, loop, progress)
            if stopped:
                break
            _finish_epoch(run, loop, progress, seconds, images)
    finally:
        progress.close()
    if loop.workdir is not None and run.saved_step != run.step:
        _save_checkpoint(run, loop)
    return run.state, run.history, run.restored_epochs


def optimizer_config(
    optimizer_kind: str, steps_per_epoch: int, epochs: int, **settings: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The (cached) :func:`make_optimizer` of these settings and its learning-rate schedule.

    The same settings give the same optimizer object, so that the jitted steps (static in
    the optimizer) are reused, not recompiled, by every run with those settings.
    """
    bound = inspect.signature(make_optimizer).bind(
        optimizer_kind, steps_per_epoch, epochs, **settings
    )
    bound.apply_defaults()  # one cache entry per setting, however it was passed
    transform = _cached_optimizer(*bound.args)
    peak_lr = bound.arguments["peak_lr"]
    return transform, learning_rate_schedule(optimizer_kind, steps_per_epoch, epochs, peak_lr)


def fit(
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    train_batches: Callable[[int, int], Iterable[Batch]],
    eval_batches: Callable[[], Iterable[Batch]],
    epochs: int,
    steps_per_epoch: int,
    optimizer_kind: str = "base",
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    checkpoint_every_steps: int | None = None,
    log_every: int | None = 50,
    max_steps: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    progress_bar: bool | None = None,
    optimizer: str = "sgd",
    peak_lr: float | None = None,
    compute_dtype: str | None = None,
    label_smoothing: float = 0.0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains (or fine-tunes) a model, evaluating after every epoch; resumable.

    If ``workdir`` holds a checkpoint of this run, training continues from it (``variables``
    then only give the expected shapes) and the result equals that of an uninterrupted
    run; a checkpoint of another model or configuration is refused with a ValueError.
    Per epoch, the metrics (``METRIC_COLUMNS``: ``lr`` at the epoch's first step,
    ``epoch_seconds`` training plus evaluation, ``images_per_second`` training only) go to
    ``workdir/metrics.jsonl`` and ``workdir/metrics.csv``. This is :func:`run_loop` for one
    model; :func:`train.split.train_replicas` is the same loop for k replicas.

    Args:
      model: the Linen model of ``variables`` (dense or pruned).
      variables: initial ``{"params": ..., "batch_stats": ...}``.
      train_batches: ``(epoch, start_step) -> iterable`` of the epoch's batches from
        step ``start_step`` on, ``{"image": float32 (B, H, W, 3), "label": int32 (B,)}``.
      eval_batches: ``() -> iterable`` of test batches.
      epochs: epochs of the run.
      steps_per_epoch: optimizer steps per epoch.
      optimizer_kind: schedule, ``"base"``, ``"finetune"`` or ``"fast"``.
      workdir: where metrics and checkpoints go (None: nothing is written).
      seed: seed of the training key (data order and initialisation are the caller's).
      checkpoint_every_steps: also checkpoint every that many steps (besides each epoch).
      log_every: steps between progress updates (None or 0: none).
      max_steps: stop (and checkpoint) once this many steps are done.
      momentum: SGD momentum (AdamW: b1).
      weight_decay: coupled L2 weight decay (AdamW: decoupled).
      nesterov: Nesterov momentum.
      progress_bar: tqdm bar (True) or plain lines (False); None: bar on a terminal.
      optimizer: ``"sgd"`` or ``"adamw"`` (see :func:`make_optimizer`).
      peak_lr: the schedule's peak learning rate (default: the schedule's own).
      compute_dtype: mixed precision (see :func:`train_step`), e.g. ``"bfloat16"`` on GPUs.
      label_smoothing: the training loss's label smoothing, in [0, 1) (see
        :func:`cross_entropy`; the test loss stays plain cross-entropy).

    Returns:
      ``(variables, history)``: the final variables and one metrics dict per epoch.

    Example:
      >>> variables, history = fit(model, variables, train_batches=loader.epoch,
      ...     eval_batches=test_loader, epochs=30, steps_per_epoch=391,
      ...     optimizer_kind="fast", workdir="runs/vgg11")
    """
    config = dict(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        optimizer_kind=optimizer_kind,
        seed=seed,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    # recorded only when not the default, so that older checkpoints still resume
    config |= {"optimizer": optimizer} if optimizer != "sgd" else {}
    config |= {"peak_lr": peak_lr} if peak_lr is not None else {}
    config |= {"compute_dtype": compute_dtype} if compute_dtype is not None else {}
    label_smoothing = check_label_smoothing(label_smoothing)
    config |= {"label_smoothing": label_smoothing} if label_smoothing else {}
    transform, schedule = optimizer_config(
        optimizer_kind, steps_per_epoch, epochs, momentum=momentum, weight_decay=weight_decay,
        nesterov=nesterov, optimizer=optimizer, peak_lr=peak_lr,
    )  # fmt: skip
    step = functools.partial(
        train_step,
        model=model,
        optimizer=transform,
        compute_dtype=compute_dtype,
        label_smoothing=label_smoothing,
    )
    loop = TrainLoop(
        step=step,
        train_batches=train_batches,
        evaluate=lambda state: [evaluate(model, state.variables, eval_batches())],
        stored=to_host,
        restored=lambda state, stored: stored,
        schedule=schedule,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        config=config,
        workdir=None if workdir is None else Path(workdir).absolute(),
        checkpoint_every_steps=checkpoint_every_steps,
        max_steps=max_steps,
    )
    state = create_train_state(model, variables, transform, seed=seed)
    state, history, _ = run_loop(loop, state, log_every=log_every, progress_bar=progress_bar)
    return state.variables, history
