"""Split training, FaP and PaF end to end on a tiny model and tiny synthetic data, and
resuming them."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import ifjax
import train.pipelines
import train.training
from ifjax.checkpoint import restore_model, restore_pytree
from models import VGG
from tests.tree_asserts import assert_trees_equal
from train.data import ArrayDataset, normalize
from train.pipelines import (
    REPORT_COLUMNS,
    FapOptions,
    PipelineOptions,
    SplitOptions,
    fap,
    paf,
    prune_schedule,
    prune_to_widths,
    split_train,
)

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
PAF = dict(
    k=2,
    epochs=2,
    sparsity=0.5,
    prune_steps=1,
    epochs_per_step=1,
    finetune_epochs=1,
    baseline_finetune_epochs=1,
    seed=0,
    **SCHEDULE,
)
FAP = dict(
    k=2,
    epochs=2,
    sparsity=0.5,
    prune_steps=2,
    epochs_per_step=1,
    finetune_epochs=1,
    fusion_finetune_epochs=0,
    baseline=False,
    fusion_method="weight",
    **SCHEDULE,
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


@pytest.fixture(scope="module")
def paf_run(data, tmp_path_factory):
    """An uninterrupted PaF (with the baseline): ``(workdir, result)``."""
    workdir = tmp_path_factory.mktemp("paf")
    return workdir, paf(MODEL, data, workdir=workdir, **PAF)


@pytest.fixture(scope="module")
def fap_run(data, tmp_path_factory):
    """An uninterrupted FaP: ``(workdir, result)``."""
    workdir = tmp_path_factory.mktemp("fap")
    return workdir, fap(MODEL, data, workdir=workdir, **FAP)


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


def test_paf_end_to_end_with_baseline(paf_run):
    tmp_path, result = paf_run
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


def test_fap_end_to_end(fap_run):
    tmp_path, result = fap_run
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


# ----------------------------------------------------------------------------- resuming


def _counted(monkeypatch, module, name, fail_on_call=None):
    """Replaces ``module.name`` by a wrapper counting its calls (``calls[0]``) that raises
    a RuntimeError on call number ``fail_on_call``, as an interruption would."""
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_on_call:
            raise RuntimeError(f"interrupted in call {calls[0]} of {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _assert_same_run(resumed, uninterrupted):
    """Same stages, accuracies and parameter counts, and the same final variables."""
    same = lambda result: [
        (r["pipeline"], r["stage"], r["top1_each"], r["params"]) for r in result.report["rows"]
    ]
    assert same(resumed) == same(uninterrupted)
    assert resumed.report["summary"]["top1"] == uninterrupted.report["summary"]["top1"]
    assert resumed.model == uninterrupted.model
    assert_trees_equal(resumed.variables, uninterrupted.variables)


def test_fap_resumes_after_the_finished_stages(data, fap_run, tmp_path, monkeypatch):
    # fused model, prune_steps=2: the second prune_to_widths call is in prune_step_2
    with monkeypatch.context() as patch:
        _counted(patch, train.pipelines, "prune_to_widths", fail_on_call=2)
        with pytest.raises(RuntimeError, match="interrupted"):
            fap(MODEL, data, workdir=tmp_path, **FAP)
    stages = tmp_path / "stages" / "fap"
    done = ["00_split_train", "01_fuse", "02_fusion_finetune", "03_prune_step_1"]
    assert sorted(p.parent.name for p in stages.glob("*/output")) == done
    recorded = [restore_pytree(stages / name / "output")[1]["row"] for name in done]

    trained = _counted(monkeypatch, train.pipelines, "train_replicas")
    fused = _counted(monkeypatch, train.pipelines, "fuse")
    pruned = _counted(monkeypatch, train.pipelines, "prune_to_widths")
    resumed = fap(MODEL, data, workdir=tmp_path, **FAP)
    # only prune_step_2 and finetune ran: one pruning, two trainings, no fusion
    assert (trained[0], fused[0], pruned[0]) == (2, 0, 1)
    assert resumed.report["rows"][:4] == recorded  # rows (seconds too) as recorded
    _assert_same_run(resumed, fap_run[1])
    assert not list(stages.glob("*/training"))  # training checkpoints of finished stages go


def test_paf_resumes_inside_an_interrupted_training(data, paf_run, tmp_path, monkeypatch):
    # epochs of train.training._train_epoch: paf split 1-2, prune 3, finetune 4;
    # baseline train 5-6, prune 7, finetune 8. Interrupt the baseline's 2nd epoch.
    with monkeypatch.context() as patch:
        _counted(patch, train.training, "_train_epoch", fail_on_call=6)
        with pytest.raises(RuntimeError, match="interrupted"):
            paf(MODEL, data, workdir=tmp_path, **PAF)
    training = tmp_path / "stages" / "baseline" / "00_train" / "training"
    checkpoints = [p.name for p in (training / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("step_")
    assert len((training / "metrics.jsonl").read_text().splitlines()) == 1

    epochs = _counted(monkeypatch, train.training, "_train_epoch")
    trained = _counted(monkeypatch, train.pipelines, "train_replicas")
    fused = _counted(monkeypatch, train.pipelines, "fuse")
    lines = []
    resumed = paf(MODEL, data, workdir=tmp_path, **dict(PAF, log=lines.append))
    # every PaF stage loaded; the baseline's training went on from its first epoch
    assert (epochs[0], trained[0], fused[0]) == (3, 3, 0)
    assert any("resumed at step" in line and "(epoch 2, 0 of its" in line for line in lines)
    _assert_same_run(resumed, paf_run[1])
    assert not training.exists()


def test_other_settings_in_a_workdir_are_refused(data, fap_run, tmp_path):
    workdir = tmp_path / "fap"
    shutil.copytree(fap_run[0], workdir)
    config = (workdir / "stages" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"differing keys: epochs, sparsity;.*overwrite"):
        fap(MODEL, data, workdir=workdir, **dict(FAP, epochs=3, sparsity=0.25))
    settings = {k: v for k, v in FAP.items() if k != "fusion_finetune_epochs"}
    with pytest.raises(ValueError, match=r"holds a fap run .*differing keys: .*pipeline"):
        paf(MODEL, data, workdir=workdir, **settings)
    assert (workdir / "stages" / "config.json").read_text() == config
    # the device layout is not a setting of the result: every stage is loaded
    again = fap(MODEL, data, workdir=workdir, **dict(FAP, num_devices=1, strategy="vmap"))
    assert again.report["rows"] == fap_run[1].report["rows"]


def test_replica_strategy_reaches_the_training_and_changes_the_speed_only(
    data, tmp_path, monkeypatch
):
    settings = dict(k=2, epochs=1, batch_size=16, optimizer_kind="fast", augment=False)
    settings |= dict(fair_timing=False, log=None)
    seen, original = [], train.pipelines.train_replicas

    def spy(*args, **kwargs):
        seen.append(kwargs["strategy"])
        return original(*args, **kwargs)

    monkeypatch.setattr(train.pipelines, "train_replicas", spy)
    vmapped = split_train(MODEL, data, strategy="vmap", workdir=tmp_path / "v", **settings)
    one_by_one = split_train(MODEL, data, strategy="sequential", workdir=tmp_path / "s", **settings)
    assert seen == ["vmap", "sequential"]
    for ours, theirs in zip(vmapped.variables, one_by_one.variables, strict=True):
        assert_trees_equal(ours, theirs, rtol=1e-5, atol=1e-5)
    assert "strategy" not in vmapped.report["config"]
    with pytest.raises(ValueError, match="strategy"):
        SplitOptions(strategy="grouped")


def test_overwrite_starts_over(data, tmp_path, monkeypatch):
    settings = dict(k=2, batch_size=16, optimizer_kind="fast", augment=False, fair_timing=False)
    settings |= dict(log=None, workdir=tmp_path)
    trained = _counted(monkeypatch, train.pipelines, "train_replicas")
    first = split_train(MODEL, data, epochs=1, **settings)
    again = split_train(MODEL, data, epochs=1, **settings)  # finished: loaded, not trained
    assert trained[0] == 1 and again.report["rows"] == first.report["rows"]
    with pytest.raises(ValueError, match="differing keys: epochs;"):
        split_train(MODEL, data, epochs=2, **settings)
    second = split_train(MODEL, data, epochs=2, overwrite=True, **settings)
    assert trained[0] == 2 and second.report["config"]["epochs"] == 2
    output = tmp_path / "stages" / "split_train" / "00_split_train" / "output"
    assert restore_pytree(output)[1]["row"] == second.report["rows"][0]
    config = json.loads((tmp_path / "stages" / "config.json").read_text())
    assert config["epochs"] == 2 and config["pipeline"] == "split_train"
    split_train(MODEL, data, epochs=2, **settings)
    assert trained[0] == 2


def test_options_are_shared_and_keyword_only():
    fap_options = inspect.signature(fap).parameters
    paf_options = inspect.signature(paf).parameters
    assert list(fap_options)[:2] == ["model_name", "dataset"]
    assert set(fap_options) - set(paf_options) == {"fusion_finetune_epochs"}
    assert set(inspect.signature(split_train).parameters) < set(paf_options)
    assert fap_options["sparsity"].default == 0.6
    assert fap_options["sparsity"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match=r"paf\(\) got unexpected keyword arguments \['fusion_"):
        paf(MODEL, ("unused", "unused"), fusion_finetune_epochs=1)
    with pytest.raises(ValueError, match="prune_steps"):
        PipelineOptions(prune_steps=0)
    resolved = FapOptions(epochs_per_step=3, finetune_epochs=5).resolved()
    assert (resolved.fusion_finetune_epochs, resolved.baseline_finetune_epochs) == (3, 10)


_TWO_PROCESSES = textwrap.dedent(
    """
    import json, os, sys
    import jax
    port, process, workdir, fail_on_epoch = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process))
    import train.training
    from tests.test_pipelines import FAP, MODEL, _dataset
    from train.pipelines import fap

    original, calls = train.training._train_epoch, []
    def interruptible(*args):
        calls.append(1)
        if len(calls) == int(fail_on_epoch):
            print("INTERRUPTED", flush=True)
            os._exit(3)
        return original(*args)
    train.training._train_epoch = interruptible
    settings = dict(FAP, k=4, prune_steps=1, finetune_epochs=2, workdir=workdir)
    result = fap(MODEL, (_dataset(128, 1), _dataset(48, 2)), **settings)
    rows = [(r["stage"], r["models"], r["top1_each"]) for r in result.report["rows"]]
    print("RESULT" + json.dumps({"epochs": len(calls), "rows": rows}), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir, fail_on_epoch=0):
    """Two jax.distributed processes on this machine, two forced CPU devices each."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    port, repo = str(_free_port()), Path(__file__).resolve().parents[1]
    return [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESSES, port, str(i), str(workdir), str(fail_on_epoch)],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _outputs(processes, returncode):
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == returncode, stderr[-3000:]
        outputs.append(stdout)
    return outputs


@pytest.mark.slow
def test_fap_on_two_processes_resumes(tmp_path):
    """jax.distributed with two processes on one CPU machine (4 replicas over 4 devices,
    then one fused model on each process): interrupted in the last fine-tuning's second
    epoch and resumed, it ends where an uninterrupted two-process run ends."""
    started = []
    try:
        started += (whole := _start_two_processes(tmp_path / "whole"))
        # epochs: split 1-2, prune_step_1 3, finetune 4-5
        started += (interrupted := _start_two_processes(tmp_path / "resumed", fail_on_epoch=5))
        _outputs(interrupted, returncode=3)
        started += (resumed := _start_two_processes(tmp_path / "resumed"))
        resumed, whole = _outputs(resumed, returncode=0), _outputs(whole, returncode=0)
    finally:
        for process in started:
            process.kill()
    result = lambda out: json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[6:])
    expected = result(whole[0])
    assert expected["epochs"] == 5 and [r[1] for r in expected["rows"]] == [4, 1, 1, 1, 1]
    assert result(whole[1]) == expected
    for out in resumed:  # only the last fine-tuning's second epoch ran again
        assert result(out) == dict(expected, epochs=1)
    model = lambda name: restore_model(tmp_path / name / "model")[0]
    assert_trees_equal(model("resumed"), model("whole"))


def test_recalibrate_reestimates_batchnorm_after_fusion_and_every_pruning_step(
    data, fap_run, tmp_path, monkeypatch
):
    """FaP with ``recalibrate=40``: the fused model (the plain run's, same seed) and every
    pruned model get BatchNorm statistics of the same 40 random training images before
    they are evaluated or fine-tuned; the setting is recorded, and a rerun without it in
    the same workdir is refused."""
    seen = []
    recalibrate = ifjax.recalibrate_batchnorm

    def spy(model, variables, batches):
        seen.append((model.cfg, variables, batches))
        return recalibrate(model, variables, batches)

    monkeypatch.setattr(ifjax, "recalibrate_batchnorm", spy)
    result = fap(MODEL, data, workdir=tmp_path, **dict(FAP, recalibrate=40))
    assert [cfg for cfg, _, _ in seen] == [(8, "M", 16, "M"), (6, "M", 12, "M"), (4, "M", 8, "M")]
    chosen = np.random.default_rng(0).permutation(len(data[0]))[:40]  # random_subset
    for _, _, batches in seen:
        assert len(batches) == 1
        np.testing.assert_array_equal(batches[0]["image"], normalize(data[0].images[chosen]))
    plain_workdir, plain = fap_run
    fused = restore_pytree(plain_workdir / "stages" / "fap" / "01_fuse" / "output")[0]
    assert_trees_equal(seen[0][1], fused["replica_0"])
    ours = restore_pytree(tmp_path / "stages" / "fap" / "01_fuse" / "output")[0]["replica_0"]
    expected = recalibrate(MODEL, fused["replica_0"], seen[0][2])
    assert_trees_equal(ours, expected)
    assert not np.allclose(
        ours["batch_stats"]["bn0"]["mean"], fused["replica_0"]["batch_stats"]["bn0"]["mean"]
    )
    assert result.report["config"]["recalibrate"] == 40
    assert "recalibrate" not in plain.report["config"]
    with pytest.raises(ValueError, match="differing keys: recalibrate"):
        fap(MODEL, data, workdir=tmp_path, **FAP)


def test_recalibrate_is_checked_against_the_training_set(data):
    with pytest.raises(ValueError, match="recalibrate asks for 129 training images; the "):
        paf(MODEL, data, **dict(PAF, recalibrate=129))
    with pytest.raises(ValueError, match="recalibrate must be a non-negative integer, got -1"):
        PipelineOptions(recalibrate=-1)
