"""Split training, FaP and PaF end to end on a tiny model and tiny synthetic data."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import ifjax
import train.pipelines
from ifjax.checkpoint import restore_model
from models import VGG
from tests.tree_asserts import assert_trees_equal
from train.data import ArrayDataset
from train.pipelines import REPORT_COLUMNS, fap, paf, prune_schedule, prune_to_widths, split_train

MODEL = VGG(cfg=(8, "M", 16, "M"), num_classes=3)
PROTOTYPES = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3))
SCHEDULE = dict(
    batch_size=16,
    optimizer_kind="fast",
    finetune_kind="finetune",
    fusion_samples=32,
    augment=False,  # pad-4 crops would hide most of an 8x8 image
    fair_timing=False,  # keep compiled programs between stages and tests
    log=None,
)


def _dataset(n, seed):
    """A learnable task: the label's prototype image plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = np.clip(PROTOTYPES[labels] + rng.normal(0, 40, (n, 8, 8, 3)), 0, 255)
    return ArrayDataset(images.astype(np.uint8), labels, 3)


def _numpy_init(model, seed, input_shape):
    """He-initialised kernels, zero biases, unit BatchNorm, drawn with numpy (no compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros(input_shape, np.float32))

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "kernel":
            scale = np.sqrt(2 / np.prod(leaf.shape[:-1]))
            return (scale * rng.normal(size=leaf.shape)).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("var", "scale") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", autouse=True)
def fast_init():
    """The pipelines' initialisation is not under test; compiling it costs seconds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.pipelines, "init_variables", _numpy_init)
        yield


@pytest.fixture(scope="module")
def data():
    return _dataset(128, 1), _dataset(48, 2)


def test_prune_schedule_reaches_the_keep_count():
    assert prune_schedule({0: 64, 1: 10}, 0.5, 4) == [
        {0: 56, 1: 8},
        {0: 48, 1: 7},
        {0: 40, 1: 6},
        {0: 32, 1: 5},
    ]
    assert prune_schedule({0: 7}, 0.6, 1) == [{0: ifjax.keep_count(7, 0.6)}] == [{0: 2}]
    with pytest.raises(ValueError):
        prune_schedule({0: 7}, 0.5, 0)


def _check_report(workdir, result, pipeline, stages):
    report = json.loads((workdir / "report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert [(r["pipeline"], r["stage"]) for r in report["rows"]] == stages
    for row in report["rows"]:
        assert (
            0.0 <= row["top1"] <= 1.0
            and row["seconds"] > 0
            and len(row["top1_each"]) == row["models"]
        )
    ours = [r for r in report["rows"] if r["pipeline"] == pipeline]
    assert ours[-1]["cumulative_seconds"] == pytest.approx(sum(r["seconds"] for r in ours))
    assert report["summary"]["top1"] == ours[-1]["top1"]
    csv = (workdir / "report.csv").read_text().splitlines()
    assert csv[0] == ",".join(REPORT_COLUMNS) and len(csv) == len(stages) + 1
    assert "| summary | value |" in (workdir / "report.md").read_text()
    return report


def test_paf_end_to_end_with_baseline(data, tmp_path):
    result = paf(
        MODEL,
        data,
        k=2,
        epochs=2,
        sparsity=0.5,
        prune_steps=1,
        epochs_per_step=1,
        finetune_epochs=1,
        baseline_finetune_epochs=1,
        workdir=tmp_path,
        seed=0,
        **SCHEDULE,
    )
    stages = [("paf", s) for s in ("split_train", "prune_step_1", "fuse", "finetune")]
    stages += [("baseline", s) for s in ("train", "prune_step_1", "finetune")]
    report = _check_report(tmp_path, result, "paf", stages)
    rows = {(r["pipeline"], r["stage"]): r for r in report["rows"]}
    assert rows["paf", "split_train"]["models"] == 2 and rows["paf", "fuse"]["models"] == 1
    # half the channels: conv0 3*3*3*4+4, bn0 4+4, conv1 3*3*4*8+8, bn1 8+8, dense 2*2*8*3+3
    assert result.model.cfg == (4, "M", 8, "M")
    assert rows["paf", "finetune"]["params"] == rows["baseline", "finetune"]["params"] == 531
    assert rows["baseline", "train"]["top1"] > 0.9  # the task is learnable
    assert rows["paf", "split_train"]["top1"] > 0.9 and rows["paf", "finetune"]["top1"] > 0.9
    summary = report["summary"]
    assert summary["training_speedup"] == pytest.approx(
        rows["baseline", "train"]["seconds"] / rows["paf", "split_train"]["seconds"]
    )
    variables, info = restore_model(tmp_path / "model")
    assert info["model_spec"]["fields"]["cfg"] == [4, "M", 8, "M"]
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"], result.variables["params"]["conv1"]["kernel"]
    )


def test_prune_to_widths_keeps_exactly_the_targets():
    x = np.zeros((1, 8, 8, 3), np.float32)
    variables = _numpy_init(MODEL, 0, x.shape)
    model, pruned = prune_to_widths(MODEL, variables, {0: 5, 1: 3}, example_input=x)
    assert model.cfg == (3, "M", 5, "M")
    assert {g.index: g.size for g in ifjax.discover_groups(model, pruned, x)} == {0: 5, 1: 3}
    assert model.apply(pruned, x).shape == (1, 3)
    # at the keep counts of one sparsity it is ifjax.prune of all groups
    _, halved = prune_to_widths(MODEL, variables, {0: 8, 1: 4}, example_input=x)
    _, expected, _ = ifjax.prune(MODEL, variables, "all", sparsity=0.5, example_input=x)
    assert_trees_equal(halved, expected, rtol=1e-6, atol=1e-7)


def test_fap_end_to_end(data, tmp_path):
    result = fap(
        MODEL,
        data,
        k=2,
        epochs=2,
        sparsity=0.5,
        prune_steps=2,
        epochs_per_step=1,
        finetune_epochs=1,
        fusion_finetune_epochs=0,
        baseline=False,
        workdir=tmp_path,
        fusion_method="weight",
        **SCHEDULE,
    )
    stages = ["split_train", "fuse", "fusion_finetune", "prune_step_1", "prune_step_2", "finetune"]
    report = _check_report(tmp_path, result, "fap", [("fap", s) for s in stages])
    params = [r["params"] for r in report["rows"]]
    assert params[0] == params[1] == params[2] > params[3] > params[4] == params[5] == 531
    assert "baseline_top1" not in report["summary"]
    assert report["config"]["fusion_method"] == "weight" and report["config"]["k"] == 2


def test_split_train_kfold_halves(data, tmp_path):
    result = split_train(
        MODEL,
        data,
        k=2,
        kfold=True,
        epochs=2,
        batch_size=16,
        optimizer_kind="fast",
        augment=False,
        workdir=tmp_path,
        fair_timing=False,
        log=None,
    )
    assert len(result.variables) == 2  # C(2, 1): the two halves
    (row,) = result.report["rows"]
    assert row["models"] == 2 and len(row["top1_each"]) == 2
    assert sorted(p.name for p in tmp_path.glob("replica_*")) == ["replica_0", "replica_1"]
    kernels = [v["params"]["conv0"]["kernel"] for v in result.variables]
    assert not np.allclose(kernels[0], kernels[1])
