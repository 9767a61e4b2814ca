"""Split-data training: disjoint splits of a training set, and k replicas trained at once.

Splits (paper section 6): :func:`split_indices` cuts the training set into k disjoint,
equal parts (a different cut per seed); :func:`kfold_training_sets` gives the k-fold
variant's C(k, k/2) training sets, each the union of k/2 parts.

Replicas in one program: the k models' params, BatchNorm statistics and optimizer states
are stacked on a leading *replica* axis and trained by ONE jit-compiled ``jax.vmap`` of
:func:`train.training.train_step`. Every replica reads its own data stream (the step's
batch has shape (k, B, H, W, C)) and keeps its own BatchNorm statistics (nothing is
reduced across the replica axis), so replica r follows exactly the trajectory a separate
training run with the same seeds and data would.

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

Resuming: with ``checkpoint_dir``, :func:`train_replicas` saves the stacked training
state after every epoch (``checkpoint_dir/epoch_<N>/``, :func:`ifjax.checkpoint.save_pytree`,
atomic; process 0 writes, so with several hosts the directory must be on a shared file
system) and a later call with the same settings continues from the newest one. Every
epoch's batches depend only on (seed, replica, epoch), so the resumed run equals the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ifjax.checkpoint import restore_pytree, save_pytree
from models.layers import inference_jit
from train.data import Dataset, batches
from train.training import (
    TrainState,
    _check_matches,
    _fixed_size_batches,
    check_checkpoint_identity,
    create_train_state,
    eval_step,
    make_optimizer,
    train_step,
)

__all__ = [
    "REPLICA_AXIS",
    "IndexedDataset",
    "evaluate_replicas",
    "kfold_training_sets",
    "replica_mesh",
    "replica_seed",
    "replica_train_step",
    "shard_replicas",
    "split_indices",
    "stack_trees",
    "sync_processes",
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


@dataclasses.dataclass(frozen=True, eq=False)
class IndexedDataset:
    """A view of the examples ``indices`` of a dataset (no copy); a :class:`Dataset`."""

    base: Dataset
    indices: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, indices: np.ndarray, rng: np.random.Generator | None = None):
        """Examples ``self.indices[indices]`` of the base dataset (see ``Dataset``)."""
        return self.base.get_batch(self.indices[np.asarray(indices)], rng)


def replica_seed(seed: int, replica: int) -> int:
    """A non-negative 31-bit seed for replica ``replica`` of a run with seed ``seed``."""
    return int(np.random.SeedSequence([seed, replica]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------- stacking


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks equal-structured pytrees on a new leading axis (k, ...), on the host (numpy)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(list(trees)))


def _to_host(tree: Any) -> Any:
    """Every process gets the whole of a (possibly multi-host sharded) tree as numpy."""
    leaves = jax.tree.leaves(tree)
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def unstack_tree(tree: Any) -> list[Any]:
    """The inverse of :func:`stack_trees`: k pytrees (fetched to this host as numpy)."""
    tree = _to_host(tree)
    k = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(k)]


def sync_processes(name: str) -> None:
    """Waits until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


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
    model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh | None = None
) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """One jit-compiled, vmapped :func:`train.training.train_step` over stacked replicas.

    Args:
      model: the Linen model (the same architecture for every replica).
      optimizer: the optax optimizer of the states.
      mesh: lay the replica axis out over this mesh (None: no sharding constraint).

    Returns:
      ``step(states, batch) -> (states, metrics)``: ``states`` a :class:`TrainState`
      whose leaves have a leading replica axis k, ``batch`` ``{"image": (k, B, H, W,
      C), "label": (k, B)}``; metrics are (k,) arrays. The input states are donated.

    Example:
      >>> step = replica_train_step(model, optimizer, replica_mesh(k))
      >>> states, metrics = step(states, {"image": images, "label": labels})
    """
    per_replica = functools.partial(train_step, model=model, optimizer=optimizer)
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
    step = _replica_eval_step(model, mesh)
    totals = None
    for batch in _fixed_size_batches(eval_batches):
        out = step(stacked_variables, batch)
        sums = (out["loss_sum"], out["correct"], out["count"])
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluate_replicas got no batches")
    loss_sum, correct, count = (np.asarray(x) for x in _to_host(totals))
    return [
        {"top1": float(c) / int(n), "loss": float(s) / int(n), "count": int(n)}
        for s, c, n in zip(loss_sum, correct, count, strict=True)
    ]


# ----------------------------------------------------------------------------- training


def _local_replicas(mesh: Mesh, k: int) -> list[int]:
    """Replicas whose shards live on this process's devices."""
    indices = _sharding(mesh).addressable_devices_indices_map((k,)).values()
    return sorted({r for (s,) in indices for r in range(k)[s]})


def _replica_batch(streams: Mapping[int, Any], k: int, mesh: Mesh) -> dict[str, jax.Array] | None:
    """Next batch of every local replica, as global (k, B, ...) arrays sharded by replica."""
    local = {r: next(stream, None) for r, stream in streams.items()}
    if any(b is None for b in local.values()):
        return None
    first = next(iter(local.values()))
    sharding = _sharding(mesh)

    def global_array(key):
        shape = (k,) + np.shape(first[key])
        fetch = lambda index: np.stack([local[r][key] for r in range(k)[index[0]]])[
            (slice(None),) + tuple(index[1:])
        ]
        return jax.make_array_from_callback(shape, sharding, fetch)

    return {key: global_array(key) for key in ("image", "label")}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What stays fixed while training replicas."""

    model: nn.Module
    datasets: tuple[Dataset, ...]
    batch_size: int
    steps_per_epoch: int
    seeds: tuple[int, ...]
    augment: bool
    mesh: Mesh


def _streams(plan: _Plan, epoch: int) -> dict[int, Any]:
    """This epoch's batch iterator of every replica this process feeds."""
    return {
        r: batches(
            plan.datasets[r],
            plan.batch_size,
            shuffle=True,
            augment=plan.augment,
            seed=plan.seeds[r],
            epoch=epoch,
            drop_remainder=True,
        )
        for r in _local_replicas(plan.mesh, len(plan.datasets))
    }


def _train_epoch(plan: _Plan, step_fn, states, epoch: int):
    """One epoch over every replica's stream; returns states, metric sums and steps."""
    streams = _streams(plan, epoch)
    sums, steps = None, 0
    while steps < plan.steps_per_epoch:
        batch = _replica_batch(streams, len(plan.datasets), plan.mesh)
        if batch is None:
            break
        states, metrics = step_fn(states, batch)
        pair = (metrics["loss"], metrics["accuracy"])
        sums = pair if sums is None else jax.tree.map(jnp.add, sums, pair)
        steps += 1
    for stream in streams.values():
        stream.close()
    return states, sums, steps


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
    checkpoint_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Trains k replicas of one architecture, each on its own dataset, in one program.

    Replica r starts from ``variables_list[r]`` with training key seed and data seed
    ``replica_seed(seed, r)`` and reads ``batches(datasets[r], batch_size, shuffle=True,
    augment=augment, seed=replica_seed(seed, r), epoch=e, drop_remainder=True)``: the
    same run as ``train.training.fit`` with those seeds and batches, for every replica
    at once (vmapped, sharded over ``replica_mesh(k, num_devices)``).

    Args:
      model: the Linen model of every replica (equal widths).
      variables_list: k initial ``{"params": ..., "batch_stats": ...}``.
      datasets: k datasets of at least ``batch_size`` examples (e.g.
        :class:`IndexedDataset` splits).
      epochs: epochs to train.
      batch_size: examples per replica and step.
      optimizer_kind: learning-rate schedule (see :func:`train.training.make_optimizer`).
      seed: run seed.
      augment: CIFAR crop + flip augmentation.
      num_devices: at most this many devices for the replica axis (None: all).
      eval_batches: ``() -> iterable`` of test batches, evaluated after every epoch.
      steps_per_epoch: steps per epoch (default and maximum: the smallest dataset's
        ``len // batch_size``); fewer makes quick runs.
      momentum, weight_decay: SGD settings.
      checkpoint_dir: save the training state here after every epoch and, if it holds
        a checkpoint of this training (same settings and shapes, else a ValueError),
        continue from it (None: no checkpoints).
      log: where one line per epoch goes (None: nowhere).

    Returns:
      ``(variables_list, history)``: the k trained variables (numpy, on this host) and
      one record per epoch with per-replica ``train_loss``, ``train_acc``,
      ``test_top1`` (when evaluated) and the epoch's ``seconds``; records of epochs
      restored from a checkpoint also have ``"restored": True``.

    Example:
      >>> parts = split_indices(len(train), 2, seed=0)
      >>> trained, history = train_replicas(model, [v0, v1],
      ...     [IndexedDataset(train, p) for p in parts], epochs=30, batch_size=128)
    """
    k = len(variables_list)
    if k < 1 or len(datasets) != k:
        raise ValueError(f"need one dataset per replica, got {len(datasets)} for {k} replicas")
    steps = min(len(d) for d in datasets) // batch_size
    if steps < 1:
        raise ValueError(f"every dataset needs at least batch_size={batch_size} examples")
    steps = steps if steps_per_epoch is None else min(steps, steps_per_epoch)
    optimizer = _optimizer(optimizer_kind, steps, epochs, momentum, weight_decay)
    seeds = tuple(replica_seed(seed, r) for r in range(k))
    mesh = replica_mesh(k, num_devices)
    plan = _Plan(model, tuple(datasets), batch_size, steps, seeds, augment, mesh)
    states = [
        create_train_state(model, variables, optimizer, seed=s)
        for variables, s in zip(variables_list, seeds, strict=True)
    ]
    states = stack_trees(states)
    checkpoints = None
    if checkpoint_dir is not None:
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
        checkpoints = _ReplicaCheckpoints(Path(checkpoint_dir).absolute(), config)
    states, history = (states, []) if checkpoints is None else checkpoints.restore(states, log)
    states = shard_replicas(states, plan.mesh)
    step_fn = replica_train_step(model, optimizer, plan.mesh)
    for epoch in range(len(history), epochs):
        start = time.perf_counter()
        states, sums, done = _train_epoch(plan, step_fn, states, epoch)
        jax.block_until_ready(states)
        record = _epoch_record(epoch, done, sums, time.perf_counter() - start)
        if eval_batches is not None:
            scores = evaluate_replicas(model, states.variables, eval_batches(), plan.mesh)
            record["test_top1"] = [s["top1"] for s in scores]
        history.append(record)
        if log is not None:
            log(_epoch_line(record, epochs))
        if checkpoints is not None:
            checkpoints.save(states, history)
    return unstack_tree(states.variables), history


@dataclasses.dataclass(frozen=True)
class _ReplicaCheckpoints:
    """The stacked training states of :func:`train_replicas`, one ``epoch_<N>`` per epoch."""

    directory: Path
    config: dict[str, Any]

    def found(self) -> list[Path]:
        """Checkpoint directories (hidden temporaries excluded), oldest first."""
        if not self.directory.is_dir():
            return []
        names = [p for p in self.directory.iterdir() if re.fullmatch(r"epoch_\d+", p.name)]
        return sorted(names, key=lambda p: int(p.name.split("_")[1]))

    def save(self, states: TrainState, history: list[dict[str, Any]]) -> None:
        """Saves the states after ``len(history)`` epochs (process 0), keeps only the newest."""
        tree = flax.serialization.to_state_dict(_to_host(states))
        if jax.process_index() == 0:
            metadata = {"kind": "replica_train_state", "config": self.config, "history": history}
            path = self.directory / f"epoch_{len(history):05d}"
            save_pytree(path, tree, metadata=metadata, overwrite=True)
            for old in self.found()[:-1]:
                shutil.rmtree(old)
        sync_processes("ifjax_replica_checkpoint")

    def restore(self, states: TrainState, log) -> tuple[TrainState, list[dict[str, Any]]]:
        """The newest checkpoint's states and history, or ``(states, [])`` if there is none."""
        found = self.found()
        if not found:
            return states, []
        tree, info = restore_pytree(found[-1])
        check_checkpoint_identity(
            found[-1],
            info,
            self.config,
            kind="replica_train_state",
            what="replica training",
            owner="replica training with settings",
            fix=f"remove {self.directory} to start it over",
        )
        _check_matches(found[-1], tree, flax.serialization.to_state_dict(states))
        history = [dict(record, restored=True) for record in info["history"]]
        if log is not None:
            log(f"replicas: resumed after epoch {len(history)} from {found[-1]}")
        return flax.serialization.from_state_dict(states, jax.device_get(tree)), history


_optimizer = functools.lru_cache(maxsize=16)(make_optimizer)


def _epoch_record(epoch: int, steps: int, sums, seconds: float) -> dict[str, Any]:
    if sums is None:
        raise ValueError(f"no training batch in epoch {epoch}")
    loss, accuracy = (np.asarray(x) / steps for x in _to_host(sums))
    return {
        "epoch": epoch + 1,
        "steps": steps,
        "train_loss": loss.tolist(),
        "train_acc": accuracy.tolist(),
        "seconds": seconds,
    }


def _epoch_line(record: Mapping[str, Any], epochs: int) -> str:
    fmt = lambda values: " ".join(f"{v:.4f}" for v in values)
    line = (
        f"replicas epoch {record['epoch']}/{epochs}: loss [{fmt(record['train_loss'])}] "
        f"acc [{fmt(record['train_acc'])}] | {record['seconds']:.1f}s"
    )
    if "test_top1" in record:
        line += f" | test top1 [{fmt(record['test_top1'])}]"
    return line
