"""Splits, vmapped replica training (= separate runs) and sharding over forced CPU devices."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import train.split
import train.training
from models import VGG
from tests.tree_asserts import assert_trees_equal
from train.data import ArrayDataset, batches
from train.split import (
    IndexedDataset,
    _mesh_devices,
    choose_strategy,
    evaluate_models,
    kfold_training_sets,
    replica_seed,
    split_indices,
    train_replicas,
)
from train.training import evaluate, fit

MODEL = VGG(cfg=(4, "M", 8, "M"), num_classes=3)
REPO = Path(__file__).resolve().parents[1]


def _numpy_variables(model, seed):
    """He-initialised kernels, zero biases, unit BatchNorm, drawn with numpy (no compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "kernel":
            scale = np.sqrt(2 / np.prod(leaf.shape[:-1]))
            return (scale * rng.normal(size=leaf.shape)).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("var", "scale") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _dataset(n=96, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return ArrayDataset(images, rng.integers(0, 3, n).astype(np.int32), 3)


def test_split_indices_are_disjoint_equal_and_reproducible():
    parts = split_indices(103, 4, seed=7)
    assert [len(p) for p in parts] == [25] * 4
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == 100 and joined.min() >= 0 and joined.max() < 103
    assert all(np.all(np.diff(p) > 0) for p in parts)
    again = split_indices(103, 4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split_indices(103, 4, seed=8)
    assert not np.array_equal(parts[0], other[0])
    with pytest.raises(ValueError):
        split_indices(3, 4, seed=0)


def test_kfold_training_sets_are_unions_of_half_the_parts():
    parts = split_indices(40, 4, seed=1)
    sets = kfold_training_sets(40, 4, seed=1)
    assert len(sets) == 6 and all(len(s) == 20 for s in sets)
    np.testing.assert_array_equal(sets[0], np.sort(np.concatenate([parts[0], parts[1]])))
    np.testing.assert_array_equal(sets[5], np.sort(np.concatenate([parts[2], parts[3]])))
    # every example is in exactly 3 of the 6 sets (C(3, 1) choices of the other part)
    counts = np.bincount(np.concatenate(sets), minlength=40)
    assert set(counts[np.concatenate(parts)]) == {3}
    halves = kfold_training_sets(40, 2, seed=1)
    assert [s.tolist() for s in halves] == [p.tolist() for p in split_indices(40, 2, seed=1)]
    with pytest.raises(ValueError, match="even"):
        kfold_training_sets(40, 3, seed=1)


def test_indexed_dataset_reads_its_examples():
    base = _dataset()
    view = IndexedDataset(base, np.array([5, 9, 2]))
    images, labels = view.get_batch(np.array([2, 0]))
    np.testing.assert_array_equal(images, base.images[[2, 5]])
    np.testing.assert_array_equal(labels, base.labels[[2, 5]])
    assert len(view) == 3 and view.num_classes == 3


@pytest.mark.parametrize(
    "strategy, label_smoothing", [("vmap", 0.0), ("sequential", 0.0), ("vmap", 0.2)]
)
def test_train_replicas_equals_separate_fits(strategy, label_smoothing):
    train, test = _dataset(), _dataset(32, seed=1)
    datasets = [IndexedDataset(train, p) for p in split_indices(len(train), 2, seed=0)]
    initial = [_numpy_variables(MODEL, seed=r) for r in range(2)]
    evaluate = lambda: batches(test, 16, shuffle=False, augment=False)
    trained, history = train_replicas(
        MODEL,
        initial,
        datasets,
        epochs=2,
        batch_size=16,
        optimizer_kind="fast",
        seed=3,
        eval_batches=evaluate,
        strategy=strategy,
        label_smoothing=label_smoothing,
        log=None,
    )
    assert [h["step"] for h in history] == [3, 6]
    for r in range(2):
        seed = replica_seed(3, r)
        expected, fit_history = fit(
            MODEL,
            initial[r],
            eval_batches=evaluate,
            epochs=2,
            steps_per_epoch=3,
            optimizer_kind="fast",
            seed=seed,
            log_every=None,
            label_smoothing=label_smoothing,
            train_batches=lambda epoch, start, r=r, seed=seed: batches(
                datasets[r],
                16,
                shuffle=True,
                augment=True,
                seed=seed,
                epoch=epoch,
                drop_remainder=True,
                start_step=start,
            ),
        )
        assert_trees_equal(trained[r], jax.device_get(expected), rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(history, fit_history, strict=True):
            np.testing.assert_allclose(ours["train_loss"][r], theirs["train_loss"], rtol=1e-5)
            np.testing.assert_allclose(ours["test_loss"][r], theirs["test_loss"], rtol=1e-5)
            assert ours["test_top1"][r] == theirs["test_top1"]
            assert ours["lr"] == theirs["lr"]
    kernel = lambda variables: variables["params"]["conv0"]["kernel"]
    assert not np.allclose(kernel(trained[0]), kernel(initial[0]))


def _replicas(workdir, **kwargs):
    data = _dataset()
    datasets = [IndexedDataset(data, p) for p in split_indices(len(data), 2, seed=0)]
    initial = [_numpy_variables(MODEL, seed=r) for r in range(2)]
    settings = dict(epochs=2, batch_size=16, optimizer_kind="fast", seed=3, log=None)
    return train_replicas(MODEL, initial, datasets, workdir=workdir, **(settings | kwargs))


@pytest.fixture(scope="module")
def uninterrupted_replicas():
    return _replicas(None, strategy="vmap")


def test_train_replicas_resume_at_any_step_under_any_strategy(
    tmp_path, monkeypatch, uninterrupted_replicas
):
    expected, expected_history = uninterrupted_replicas
    original, calls = train.training._train_epoch, []

    def interrupted_in_epoch_2(run, *args):
        calls.append(run.epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(run, *args)

    monkeypatch.setattr(train.training, "_train_epoch", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _replicas(tmp_path, strategy="sequential")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000003"]
    trained, history = _replicas(tmp_path, strategy="vmap")
    assert calls == [0, 1, 1]  # epoch 0 once, epoch 1 again after the interruption
    assert [h.get("restored", False) for h in history] == [True, False]
    assert_trees_equal(trained, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history[1]["train_loss"], expected_history[1]["train_loss"])
    monkeypatch.undo()
    # stopped inside epoch 2 (max_steps), resumed there by the other strategy
    _, partial = _replicas(tmp_path / "mid", strategy="vmap", max_steps=4)
    assert len(partial) == 1
    assert sorted(p.name for p in (tmp_path / "mid" / "checkpoints").iterdir())[-1] == (
        "step_000000004"
    )
    trained, history = _replicas(tmp_path / "mid", strategy="sequential")
    assert_trees_equal(trained, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        history[1]["train_loss"], expected_history[1]["train_loss"], rtol=1e-5
    )
    rows = (tmp_path / "mid" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:6] == ["epoch", "step", "lr", "train_loss_0", "train_loss_1",
                                      "train_acc_0"]  # fmt: skip
    assert len(rows) == 3
    with pytest.raises(ValueError, match="run with config"):
        _replicas(tmp_path, epochs=3)


def test_train_replicas_names_bad_strategies_and_old_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="unknown replica strategy 'grouped'"):
        _replicas(None, strategy="grouped")
    (tmp_path / "epoch_00001").mkdir()
    with pytest.raises(ValueError, match="older ifjax"):
        _replicas(tmp_path)


def test_evaluate_models_gives_each_models_own_evaluation_under_every_strategy():
    """k models evaluated one after the other or vmapped: each as evaluated alone."""
    test = _dataset(40, seed=3)
    variables = [_numpy_variables(MODEL, seed) for seed in (1, 2, 3)]
    eval_batches = lambda: batches(test, 16, shuffle=False, augment=False)
    alone = [evaluate(MODEL, v, eval_batches()) for v in variables]
    assert len({round(s["loss"], 4) for s in alone}) == 3  # three different models
    for strategy in ("auto", "sequential", "vmap"):
        scores = evaluate_models(MODEL, variables, eval_batches, strategy=strategy)
        for got, want in zip(scores, alone, strict=True):
            assert got["top1"] == want["top1"] and got["count"] == want["count"] == 40
            np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown replica strategy 'grouped'"):
        evaluate_models(MODEL, variables, eval_batches, strategy="grouped")


def test_strategy_is_chosen_per_backend():
    assert choose_strategy(2, backend="cpu") == "sequential"
    assert choose_strategy(2, backend="gpu") == "vmap"
    assert choose_strategy(4, backend="tpu") == "vmap"


def test_mesh_takes_the_same_number_of_devices_from_every_process():
    device = collections.namedtuple("Device", "id process_index")
    ids = lambda devices: [d.id for d in devices]
    one_host = [device(i, 0) for i in range(4)]
    assert ids(_mesh_devices(one_host, 6, None, 0)) == [0, 1, 2]
    assert ids(_mesh_devices(one_host, 4, 2, 0)) == [0, 1]
    two_hosts = [device(i, i // 4) for i in range(8)]  # 4 devices on each of 2 hosts
    assert ids(_mesh_devices(two_hosts, 8, None, 1)) == list(range(8))
    assert ids(_mesh_devices(two_hosts, 6, None, 0)) == [0, 1, 2, 4, 5, 6]
    assert ids(_mesh_devices(two_hosts, 4, None, 0)) == [0, 1, 4, 5]
    assert ids(_mesh_devices(two_hosts, 2, None, 1)) == [0, 4]
    assert ids(_mesh_devices(two_hosts, 8, 4, 0)) == [0, 1, 4, 5]
    # k not a multiple of the processes (or too few devices): each process on its own
    assert ids(_mesh_devices(two_hosts, 1, None, 1)) == [4]
    assert ids(_mesh_devices(two_hosts, 3, None, 0)) == [0, 1, 2]
    assert ids(_mesh_devices(two_hosts, 3, None, 1)) == [4, 5, 6]
    assert ids(_mesh_devices(two_hosts, 4, 1, 1)) == [4]
    with pytest.raises(ValueError, match="num_devices must be >= 1"):
        _mesh_devices(one_host, 4, 0, 0)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from models import VGG
    from train.data import ArrayDataset
    from train.split import (IndexedDataset, replica_mesh, replica_train_step,
                             shard_replicas, split_indices, stack_trees, train_replicas)
    from train.training import create_train_state, optimizer_config

    model = VGG(cfg=(4, "M"), num_classes=3)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 256, (128, 8, 8, 3), dtype=np.uint8),
                        rng.integers(0, 3, 128).astype(np.int32), 3)
    datasets = [IndexedDataset(data, p) for p in split_indices(128, 4, seed=0)]
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))

    def random_init(path, leaf):  # numpy initialisation: nothing to compile
        name = str(path[-1].key)
        if name in ("var", "scale"):
            return np.ones(leaf.shape, np.float32)
        scale = 0.0 if name in ("mean", "bias") else 0.3
        return (scale * rng.normal(size=leaf.shape)).astype(np.float32)

    initial = [jax.tree_util.tree_map_with_path(random_init, shapes) for _ in range(4)]
    out = {"devices": jax.device_count(), "mesh": {}, "diff": {}, "shards": {}}
    results = {}
    for d in (1, 2, 4):
        results[d], _ = train_replicas(model, initial, datasets, epochs=2, batch_size=8,
                                       optimizer_kind="fast", seed=1, num_devices=d,
                                       strategy="shard", log=None)
        mesh = replica_mesh(4, d)
        out["mesh"][d] = mesh.shape["replica"]
        optimizer, _ = optimizer_config("fast", 4, 2)  # the one train_replicas used
        states = stack_trees([create_train_state(model, v, optimizer) for v in initial])
        states = shard_replicas(states, mesh)
        batch = {"image": np.zeros((4, 8, 8, 8, 3), np.float32),
                 "label": np.zeros((4, 8), np.int32)}
        step = replica_train_step(model, optimizer, mesh, None)  # cached: compiled above
        states, _ = step(states, shard_replicas(batch, mesh))
        kernel = states.params["conv0"]["kernel"]
        shard = list(kernel.sharding.shard_shape(kernel.shape))
        out["shards"][d] = [len(kernel.addressable_shards), shard]
    for d in (2, 4):
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[d], results[1])
        out["diff"][d] = max(jax.tree.leaves(diffs))
    out["changed"] = float(np.max(np.abs(results[1][0]["params"]["conv0"]["kernel"]
                                          - initial[0]["params"]["conv0"]["kernel"])))
    out["mesh_k6"] = replica_mesh(6).shape["replica"]
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module", autouse=True)
def sharded_run():
    """Runs the forced-device script in a subprocess (the flag must precede importing JAX),
    started before this module's other tests so that it compiles while they run."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-c", _SHARDED_SCRIPT]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_sharded_over_forced_cpu_devices_equals_unsharded(sharded_run):
    stdout, stderr = sharded_run.communicate(timeout=300)
    assert sharded_run.returncode == 0, stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert out["devices"] == 4
    assert out["mesh"] == {"1": 1, "2": 2, "4": 4} and out["mesh_k6"] == 3
    # each device holds k / d replicas of every stacked array
    assert out["shards"] == {
        "1": [1, [4, 3, 3, 3, 4]],
        "2": [2, [2, 3, 3, 3, 4]],
        "4": [4, [1, 3, 3, 3, 4]],
    }
    assert out["changed"] > 1e-3
    # every variable is O(1) (BatchNorm variances up to ~10): differences are float noise
    # (2.1e-5 measured with 4 devices on a Zen 5 CPU: a few ulps of the variances)
    assert out["diff"]["2"] < 5e-5 and out["diff"]["4"] < 5e-5
