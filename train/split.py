"""Split-data training: disjoint splits of a training set, and k replicas trained at once.

Splits (paper section 6): :func:`split_indices` cuts the training set into k disjoint,
equal parts (a different cut per seed); :func:`kfold_training_sets` gives the k-fold
variant's C(k, k/2) training sets, each the union of k/2 parts.

Replicas at once: :func:`train_replicas` runs :func:`train.training.run_loop`, the one
training loop (``fit`` runs it for one model), over k training states. A replica
*strategy* steps them: ``"vmap"`` stacks the k models' params, BatchNorm statistics and
optimizer states on a leading *replica* axis and trains them by ONE jit-compiled
``jax.vmap`` of :func:`train.training.train_step`; ``"shard"`` also splits that axis over
devices; ``"sequential"`` steps each replica with the plain jitted step in turn (faster
on XLA:CPU, where a vmapped convolution becomes a slower grouped one);
:func:`choose_strategy` picks one per backend. Every replica reads its own data stream
and keeps its own BatchNorm statistics (nothing is reduced across replicas), so replica
r follows exactly the trajectory a separate training run with the same seeds and data
would.

Sharding: the replica axis is laid out over a 1-D device mesh ``Mesh(devices,
("replica",))`` with ``NamedSharding(mesh, PartitionSpec("replica"))`` on every stacked
array, the state and the batch alike. The step is then an SPMD program in which each
device trains k / d replicas and no device talks to another. The mesh uses the largest
number of devices d <= ``jax.device_count()`` that divides k (``num_devices`` caps it).
On one CPU host, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX is
imported) gives four devices to try it.

Multiple hosts: the same code runs unchanged on every host. Start each process with::

    import jax
    jax.distributed.initialize(coordinator_address="host0:1234",
                               num_processes=N, process_id=i)  # before any other JAX call

(on Cloud TPU and SLURM clusters ``jax.distributed.initialize()`` finds these by itself;
the command line's ``--distributed`` does this, see ``docs/multihost.md``).
``jax.devices()`` then lists the devices of all hosts and :func:`replica_mesh` takes the
same number from every process, so that every process owns some replicas (when k is a
multiple of the number of processes; otherwise, e.g. for a single fused model, every
process trains all k replicas on its own devices, identically). Each process builds
only the batches of the replicas whose shards live on its own devices
(``jax.make_array_from_callback`` asks it for exactly those); results are gathered to
every host with ``multihost_utils.process_allgather``.

Resuming: with ``workdir``, the training state is checkpointed as ``fit`` does it
(``workdir/checkpoints/step_<N>/``, the replicas stacked, :func:`ifjax.checkpoint.save_pytree`,
atomic; process 0 writes, so with several hosts the directory must be on a shared file
system) after every epoch and every ``checkpoint_every_steps`` steps, and a later call
with the same settings continues from the newest one, under any strategy. Every
epoch's batches depend only on (seed, replica, epoch, step), so the resumed run equals
the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.layers import inference_jit
from train.data import Dataset, IndexedDataset, batches
from train.training import (
    Batch,
    TrainLoop,
    TrainState,
    check_label_smoothing,
    create_train_state,
    eval_step,
    evaluate,
    evaluate_with,
    optimizer_config,
    run_loop,
    to_host,
    train_step,
)

__all__ = [
    "REPLICA_AXIS",
    "STRATEGIES",
    "IndexedDataset",
    "choose_strategy",
    "evaluate_models",
    "evaluate_replicas",
    "kfold_training_sets",
    "replica_mesh",
    "replica_seed",
    "replica_train_step",
    "shard_replicas",
    "split_indices",
    "stack_trees",
    "train_replicas",
    "unstack_tree",
]

REPLICA_AXIS = "replica"


# ----------------------------------------------------------------------------- splits


def split_indices(num_examples: int, k: int, seed: int) -> list[np.ndarray]:
    """Cuts ``range(num_examples)`` into k disjoint parts of equal size.

    A permutation drawn from ``np.random.default_rng(seed)`` is cut into k parts of
    ``num_examples // k`` examples (the last ``num_examples % k`` are left out); each
    part is sorted.

    Args:
      num_examples: size of the training set.
      k: number of parts (k >= 1).
      seed: the cut's seed (same seed, same parts).

    Returns:
      k sorted int64 arrays of ``num_examples // k`` indices each, pairwise disjoint.

    Example:
      >>> [p.tolist() for p in split_indices(6, 2, seed=0)]  # doctest: +SKIP
      [[0, 3, 5], [1, 2, 4]]
    """
    if k < 1 or num_examples < k:
        raise ValueError(f"need 1 <= k <= num_examples, got k={k}, num_examples={num_examples}")
    order = np.random.default_rng(seed).permutation(num_examples)
    size = num_examples // k
    return [np.sort(order[i * size : (i + 1) * size]) for i in range(k)]


def kfold_training_sets(num_examples: int, k: int, seed: int) -> list[np.ndarray]:
    """The k-fold variant: every union of k/2 of the k parts of :func:`split_indices`.

    Args:
      num_examples: size of the training set.
      k: number of parts, even (k=2 gives the two halves; k=4 gives 6 sets).
      seed: the cut's seed.

    Returns:
      C(k, k/2) sorted index arrays of ``k/2 * (num_examples // k)`` indices, in
      lexicographic order of the chosen parts ((0, 1), (0, 2), ... for k=4).

    Example:
      >>> len(kfold_training_sets(100, 4, seed=0))
      6
    """
    if k < 2 or k % 2:
        raise ValueError(f"k must be even and >= 2, got {k}")
    parts = split_indices(num_examples, k, seed)
    combos = itertools.combinations(range(k), k // 2)
    return [np.sort(np.concatenate([parts[i] for i in combo])) for combo in combos]


def replica_seed(seed: int, replica: int) -> int:
    """A non-negative 31-bit seed for replica ``replica`` of a run with seed ``seed``."""
    return int(np.random.SeedSequence([seed, replica]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------- stacking


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks equal-structured pytrees on a new leading axis (k, ...), on the host (numpy)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(list(trees)))


def unstack_tree(tree: Any) -> list[Any]:
    """The inverse of :func:`stack_trees`: k pytrees (fetched to this host as numpy)."""
    tree = to_host(tree)
    k = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(k)]


def replica_mesh(k: int, num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the most devices (at most ``num_devices``) that divides k.

    With several processes (``jax.distributed``) every process contributes the same number
    of its devices, so that every process holds some of the replicas; when k cannot be
    split so (k not a multiple of the number of processes, e.g. one fused model), every
    process gets a mesh of its own devices and computes all k replicas itself.

    Example:
      >>> replica_mesh(4).shape  # with 2 devices  # doctest: +SKIP
      {'replica': 2}
    """
    devices = _mesh_devices(jax.devices(), k, num_devices, jax.process_index())
    return Mesh(np.asarray(devices), (REPLICA_AXIS,))


def _mesh_devices(
    devices: Sequence[Any], k: int, num_devices: int | None, process_index: int
) -> list[Any]:
    """The devices of :func:`replica_mesh`: the most (at most ``num_devices``) dividing k.

    Args:
      devices: all devices, of every process (``jax.devices()``); each has a
        ``process_index``.
      k: number of replicas.
      num_devices: cap on the devices used (None: all).
      process_index: the calling process.

    Returns:
      The first d / P local devices of each of the P processes, process by process, for
      the largest such d that divides k (one process: ``devices[:d]``); if there is none,
      the calling process's first d local devices, for the largest d dividing k.
    """
    available = len(devices) if num_devices is None else min(num_devices, len(devices))
    if available < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    by_process: dict[int, list[Any]] = {}
    for device in devices:
        by_process.setdefault(device.process_index, []).append(device)
    processes, local = len(by_process), min(len(d) for d in by_process.values())
    spread = [
        d
        for d in range(processes, available + 1, processes)
        if k % d == 0 and d // processes <= local
    ]
    if spread:
        per_process = max(spread) // processes
        return [device for p in sorted(by_process) for device in by_process[p][:per_process]]
    own = by_process[process_index]
    count = max(d for d in range(1, min(available, len(own)) + 1) if k % d == 0)
    return own[:count]


def _sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(REPLICA_AXIS))


def shard_replicas(tree: Any, mesh: Mesh) -> Any:
    """Places every (k, ...) leaf of ``tree`` with its replica axis split over ``mesh``."""
    sharding = _sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
        tree,
    )


# ----------------------------------------------------------------------------- steps


@functools.lru_cache(maxsize=32)
def replica_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    compute_dtype: str | None = None,
    label_smoothing: float = 0.0,
) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """One jit-compiled, vmapped :func:`train.training.train_step` over stacked replicas.

    Args:
      model: the Linen model (the same architecture for every replica).
      optimizer: the optax optimizer of the states.
      mesh: lay the replica axis out over this mesh (None: no sharding constraint).
      compute_dtype: mixed precision, as in :func:`train.training.train_step`.
      label_smoothing: the loss's label smoothing, as in :func:`train.training.train_step`.

    Returns:
      ``step(states, batch) -> (states, metrics)``: ``states`` a :class:`TrainState`
      whose leaves have a leading replica axis k, ``batch`` ``{"image": (k, B, H, W,
      C), "label": (k, B)}``; metrics are (k,) arrays. The input states are donated.

    Example:
      >>> step = replica_train_step(model, optimizer, replica_mesh(k))
      >>> states, metrics = step(states, {"image": images, "label": labels})
    """
    per_replica = functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        compute_dtype=compute_dtype,
        label_smoothing=label_smoothing,
    )
    vmapped = jax.vmap(per_replica)
    if mesh is None:
        return jax.jit(vmapped, donate_argnums=0)
    sharding = _sharding(mesh)
    return jax.jit(vmapped, in_shardings=sharding, out_shardings=sharding, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _replica_eval_step(model: nn.Module, mesh: Mesh | None):
    vmapped = jax.vmap(functools.partial(eval_step.__wrapped__, model=model), in_axes=(0, None))
    if mesh is None:
        return inference_jit(vmapped)
    replicated = NamedSharding(mesh, PartitionSpec())
    return inference_jit(vmapped, in_shardings=(_sharding(mesh), replicated))


def evaluate_replicas(
    model: nn.Module,
    stacked_variables: Mapping[str, Any],
    eval_batches: Iterable[Mapping[str, Any]],
    mesh: Mesh | None = None,
) -> list[dict[str, float]]:
    """Sample-weighted top-1 and loss of every replica on the same batches (vmapped).

    Returns:
      One ``{"top1", "loss", "count"}`` per replica, like :func:`train.training.evaluate`.
    """
    return evaluate_with(_replica_eval_step(model, mesh), stacked_variables, eval_batches)


def evaluate_models(
    model: nn.Module,
    variables_list: Sequence[Mapping[str, Any]],
    eval_batches: Callable[[], Iterable[Mapping[str, Any]]],
    *,
    strategy: str = "auto",
    num_devices: int | None = None,
) -> list[dict[str, float]]:
    """Top-1 and loss of k models of one architecture on the same batches, run as
    :func:`train_replicas` runs them (``strategy``, see :func:`choose_strategy`): one
    after the other (``"sequential"``, a CPU's default) or vmapped over the stacked
    variables (``"vmap"``, ``"shard"``).

    Args:
      model: the models' Linen module.
      variables_list: the k models' variables.
      eval_batches: returns the batches afresh (called once per model when sequential).
      strategy: one of :data:`STRATEGIES`.
      num_devices: devices to shard over (``"shard"``/``"auto"``).

    Returns:
      One ``{"top1", "loss", "count"}`` per model, like :func:`train.training.evaluate`.

    Example:
      >>> scores = evaluate_models(model, [a, b], lambda: batches(test, 256, shuffle=False))
    """
    k = len(variables_list)
    strategy = _resolve(strategy, k, num_devices)
    if strategy == "sequential":
        return [evaluate(model, v, eval_batches()) for v in variables_list]
    mesh = replica_mesh(k, 1 if strategy == "vmap" else num_devices)
    stacked = shard_replicas(stack_trees(variables_list), mesh)
    return evaluate_replicas(model, stacked, eval_batches(), mesh)


# ----------------------------------------------------------------------------- strategies

STRATEGIES = ("auto", "vmap", "shard", "sequential")


def choose_strategy(k: int, num_devices: int | None = None, backend: str | None = None) -> str:
    """The replica strategy :func:`train_replicas` uses with ``strategy="auto"``.

    * ``"shard"`` when the replicas can be spread over more than one device (or process):
      the replica axis is split over :func:`replica_mesh` and no device talks to another.
    * ``"sequential"`` on a CPU backend: a vmapped convolution becomes a grouped
      convolution there, which XLA:CPU runs slower than the k plain ones (measured with
      ``bench/replicas.py``, bench/README.md: k=2 VGG11-BN x0.25 on 2 cores, sequential
      0.80-1.07x the time of two separate runs, vmapped 1.03-1.71x).
    * ``"vmap"`` on GPUs and TPUs: one program keeps the accelerator busy where k small
      models alone would not.
    """
    if jax.process_count() > 1 or len(replica_mesh(k, num_devices).devices.flat) > 1:
        return "shard"
    return "sequential" if (backend or jax.default_backend()) == "cpu" else "vmap"


@dataclasses.dataclass(frozen=True)
class _Stacked:
    """``"vmap"`` and ``"shard"``: one vmapped program over states stacked on a leading
    axis, laid out over ``mesh`` (one device for ``"vmap"``)."""

    model: nn.Module
    step: Callable  # (stacked states, stacked batch) -> (states, metrics): one vmapped step
    mesh: Mesh

    def place(self, states: Sequence[TrainState]) -> TrainState:
        return shard_replicas(stack_trees(states), self.mesh)

    def batch(self, local: Mapping[int, Batch], k: int) -> dict[str, jax.Array]:
        """The replicas' batches as global (k, B, ...) arrays sharded by replica."""
        first = next(iter(local.values()))
        sharding = _sharding(self.mesh)

        def global_array(key):
            shape = (k,) + np.shape(first[key])
            fetch = lambda index: np.stack([local[r][key] for r in range(k)[index[0]]])[
                (slice(None),) + tuple(index[1:])
            ]
            return jax.make_array_from_callback(shape, sharding, fetch)

        return {key: global_array(key) for key in ("image", "label")}

    def evaluate(self, states: TrainState, eval_batches: Callable[[], Iterable[Batch]]):
        return evaluate_replicas(self.model, states.variables, eval_batches(), self.mesh)

    def stored(self, states: TrainState) -> TrainState:
        return to_host(states)

    def restored(self, states: TrainState, stored: TrainState) -> TrainState:
        return shard_replicas(stored, self.mesh)

    def variables(self, states: TrainState) -> list[dict[str, Any]]:
        return unstack_tree(states.variables)

    def local_replicas(self, k: int) -> list[int]:
        """Replicas whose shards live on this process's devices."""
        indices = _sharding(self.mesh).addressable_devices_indices_map((k,)).values()
        return sorted({r for (s,) in indices for r in range(k)[s]})


@dataclasses.dataclass(frozen=True)
class _Sequential:
    """``"sequential"``: a list of k states, each stepped by the plain jitted
    :func:`train.training.train_step` in turn (the work of k separate runs)."""

    model: nn.Module
    optimizer: optax.GradientTransformation
    compute_dtype: str | None
    label_smoothing: float

    def place(self, states: Sequence[TrainState]) -> list[TrainState]:
        return list(states)

    def step(self, states: list[TrainState], batch: Mapping[str, Any]):
        new, metrics = [], []
        for r, state in enumerate(states):
            one = {key: batch[key][r] for key in ("image", "label")}
            state, m = train_step(
                state, one, model=self.model, optimizer=self.optimizer,
                compute_dtype=self.compute_dtype, label_smoothing=self.label_smoothing,
            )  # fmt: skip
            # one replica's step at a time: two independent steps in flight at once share
            # XLA:CPU's thread pool and run slower than one after the other
            new.append(jax.block_until_ready(state))
            metrics.append(m)
        # per-replica lists: stacked on the host when the loop reads them, not per step
        return new, {key: [m[key] for m in metrics] for key in metrics[0]}

    def batch(self, local: Mapping[int, Batch], k: int) -> list[Batch]:
        return {key: [local[r][key] for r in range(k)] for key in ("image", "label")}

    def evaluate(self, states: list[TrainState], eval_batches: Callable[[], Iterable[Batch]]):
        return [evaluate(self.model, state.variables, eval_batches()) for state in states]

    def stored(self, states: list[TrainState]) -> TrainState:
        return stack_trees(states)

    def restored(self, states: list[TrainState], stored: TrainState) -> list[TrainState]:
        return unstack_tree(stored)

    def variables(self, states: list[TrainState]) -> list[dict[str, Any]]:
        return [to_host(state.variables) for state in states]

    def local_replicas(self, k: int) -> list[int]:
        return list(range(k))


def _resolve(strategy: str, k: int, num_devices: int | None) -> str:
    """``strategy`` checked, ``"auto"`` resolved (:func:`choose_strategy`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown replica strategy {strategy!r}; known: {STRATEGIES}")
    if strategy == "auto":
        strategy = choose_strategy(k, num_devices)
    if strategy == "sequential" and jax.process_count() > 1:
        raise ValueError("strategy 'sequential' runs in one process; use 'shard'")
    return strategy


def _strategy(
    strategy: str,
    k: int,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    num_devices: int | None,
    compute_dtype: str | None,
    label_smoothing: float,
) -> _Stacked | _Sequential:
    strategy = _resolve(strategy, k, num_devices)
    if strategy == "sequential":
        return _Sequential(model, optimizer, compute_dtype, label_smoothing)
    mesh = replica_mesh(k, 1 if strategy == "vmap" else num_devices)
    step = replica_train_step(model, optimizer, mesh, compute_dtype, label_smoothing)
    return _Stacked(model, step, mesh)


# ----------------------------------------------------------------------------- training


def _replica_batches(
    runner: _Stacked | _Sequential,
    datasets: Sequence[Dataset],
    batch_size: int,
    seeds: Sequence[int],
    augment: bool,
):
    """``(epoch, start_step) -> iterator`` of every replica's batch of each step."""
    k = len(datasets)

    def epoch_batches(epoch: int, start_step: int):
        streams = {
            r: batches(
                datasets[r],
                batch_size,
                shuffle=True,
                augment=augment,
                seed=seeds[r],
                epoch=epoch,
                drop_remainder=True,
                start_step=start_step,
            )
            for r in runner.local_replicas(k)
        }
        try:
            while True:
                local = {r: next(stream, None) for r, stream in streams.items()}
                if any(b is None for b in local.values()):
                    return
                yield runner.batch(local, k)
        finally:
            for stream in streams.values():
                stream.close()

    return epoch_batches


def train_replicas(
    model: nn.Module,
    variables_list: Sequence[Mapping[str, Any]],
    datasets: Sequence[Dataset],
    *,
    epochs: int,
    batch_size: int,
    optimizer_kind: str = "base",
    seed: int = 0,
    augment: bool = True,
    num_devices: int | None = None,
    eval_batches: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    steps_per_epoch: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    workdir: str | os.PathLike | None = None,
    strategy: str = "auto",
    checkpoint_every_steps: int | None = None,
    max_steps: int | None = None,
    compute_dtype: str | None = None,
    label_smoothing: float = 0.0,
    log_every: int | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Trains k replicas of one architecture, each on its own dataset, at once.

    Replica r starts from ``variables_list[r]`` with training key seed and data seed
    ``replica_seed(seed, r)`` and reads ``batches(datasets[r], batch_size, shuffle=True,
    augment=augment, seed=replica_seed(seed, r), epoch=e, drop_remainder=True)``: the
    same run as :func:`train.training.fit` with those seeds and batches, for every
    replica. It is :func:`train.training.run_loop`, the loop of ``fit``, with a replica
    *strategy* stepping the k states:

    * ``"vmap"``: one jit-compiled vmapped step over the stacked states, on one device;
    * ``"shard"``: the same, the replica axis split over ``replica_mesh(k, num_devices)``
      (several devices or hosts);
    * ``"sequential"``: the plain step of each replica in turn (one process);
    * ``"auto"`` (default): :func:`choose_strategy`, from measurements per backend.

    The strategy changes the speed only: every strategy reads and writes the same
    checkpoints (stacked), so a run may resume under another one.

    Args:
      model: the Linen model of every replica (equal widths).
      variables_list: k initial ``{"params": ..., "batch_stats": ...}``.
      datasets: k datasets of at least ``batch_size`` examples (e.g.
        :class:`train.data.IndexedDataset` splits).
      epochs: epochs to train.
      batch_size: examples per replica and step.
      optimizer_kind: learning-rate schedule (see :func:`train.training.make_optimizer`).
      seed: run seed.
      augment: CIFAR crop + flip augmentation.
      num_devices: at most this many devices for the replica axis (None: all).
      eval_batches: ``() -> iterable`` of test batches, evaluated after every epoch
        (None: no evaluation, ``test_top1`` and ``test_loss`` are None).
      steps_per_epoch: steps per epoch (default and maximum: the smallest dataset's
        ``len // batch_size``); fewer makes quick runs.
      momentum, weight_decay: SGD settings.
      workdir: as :func:`train.training.fit`'s: ``metrics.jsonl``, ``metrics.csv`` and
        ``checkpoints/step_<N>/`` go here, and a run with the same settings (else a
        ValueError) continues from the newest checkpoint (None: nothing is written).
      strategy: ``"auto"``, ``"vmap"``, ``"shard"`` or ``"sequential"`` (see above).
      checkpoint_every_steps: also checkpoint every that many steps (besides each epoch).
      max_steps: stop (and checkpoint) once this many steps are done.
      compute_dtype: mixed precision, e.g. ``"bfloat16"`` (see ``train_step``).
      label_smoothing: the training loss's label smoothing, in [0, 1) (see ``train_step``).
      log_every: steps between progress lines with rate and ETA (None: epoch lines only).
      log: where the lines go (None: nowhere).

    Returns:
      ``(variables_list, history)``: the k trained variables (numpy, on this host) and
      one record per epoch (``train.training.METRIC_COLUMNS``; per-replica lists for
      ``train_loss``, ``train_acc``, ``test_top1`` and ``test_loss``); records of epochs
      restored from a checkpoint also have ``"restored": True``.

    Example:
      >>> parts = split_indices(len(train), 2, seed=0)
      >>> trained, history = train_replicas(model, [v0, v1],
      ...     [train.subset(p) for p in parts], epochs=30, batch_size=128)
    """
    k = len(variables_list)
    if k < 1 or len(datasets) != k:
        raise ValueError(f"need one dataset per replica, got {len(datasets)} for {k} replicas")
    steps = min(len(d) for d in datasets) // batch_size
    if steps < 1:
        raise ValueError(f"every dataset needs at least batch_size={batch_size} examples")
    steps = steps if steps_per_epoch is None else min(steps, steps_per_epoch)
    optimizer, schedule = optimizer_config(
        optimizer_kind, steps, epochs, momentum=momentum, weight_decay=weight_decay
    )
    label_smoothing = check_label_smoothing(label_smoothing)
    runner = _strategy(strategy, k, model, optimizer, num_devices, compute_dtype, label_smoothing)
    seeds = tuple(replica_seed(seed, r) for r in range(k))
    config = dict(
        k=k,
        dataset_sizes=[len(d) for d in datasets],
        epochs=epochs,
        batch_size=batch_size,
        steps_per_epoch=steps,
        optimizer_kind=optimizer_kind,
        seed=seed,
        augment=augment,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    config |= {"compute_dtype": compute_dtype} if compute_dtype is not None else {}
    config |= {"label_smoothing": label_smoothing} if label_smoothing else {}
    no_evaluation = [{"top1": None, "loss": None}] * k
    loop = TrainLoop(
        step=runner.step,
        train_batches=_replica_batches(runner, datasets, batch_size, seeds, augment),
        evaluate=lambda states: (
            no_evaluation if eval_batches is None else runner.evaluate(states, eval_batches)
        ),
        stored=runner.stored,
        restored=runner.restored,
        schedule=schedule,
        epochs=epochs,
        steps_per_epoch=steps,
        config=config,
        workdir=None if workdir is None else Path(workdir).absolute(),
        checkpoint_every_steps=checkpoint_every_steps,
        max_steps=max_steps,
        replicas=k,
    )
    states = runner.place(
        [
            create_train_state(model, variables, optimizer, seed=s)
            for variables, s in zip(variables_list, seeds, strict=True)
        ]
    )
    states, history, restored = run_loop(
        loop, states, log_every=log_every, progress_bar=False, log=log
    )
    history = [dict(r, restored=True) if i < restored else r for i, r in enumerate(history)]
    return runner.variables(states), history
