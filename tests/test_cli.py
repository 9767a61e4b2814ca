"""Tests of train/cli.py: argument errors are one clear line with exit status 2."""

from __future__ import annotations

import csv
import inspect
from pathlib import Path

import jax
import numpy as np
import pytest

import ifjax
from ifjax.checkpoint import save_model
from models.registry import create_model, init_variables, model_spec
from tests.tree_asserts import assert_trees_equal
from train import cli, commands, jobs, pipelines
from train import data as data_lib

OFF = ["--compilation-cache", "off"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained vgg11_bn (width 1/16) saved as the train command saves models."""
    model = create_model("vgg11_bn", 10, 0.0625)
    path = tmp_path_factory.mktemp("ck") / "model"
    metadata = dict(model="vgg11_bn", dataset="cifar10", width_multiplier=0.0625, image_size=32)
    return save_model(
        path, init_variables(model, 0), model_spec=model_spec(model), metadata=metadata
    )


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IFJAX_DATA_DIR", str(tmp_path / "no_data"))
    monkeypatch.setenv("IFJAX_CIFAR10_ZIP", str(tmp_path / "no.zip"))
    monkeypatch.setenv("IFJAX_COMPILATION_CACHE", "off")


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Runs the command line, checks it failed cleanly, returns its one-line message."""
    status = cli.main(OFF + argv)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()  # (tfds may log a warning first)
    assert [line for line in lines if "error" in line] == lines[-1:], captured.err
    assert lines[-1].startswith("ifjax: error: ")
    assert "Traceback" not in captured.err + captured.out
    return lines[-1]


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "the following arguments are required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--model", "vgg16", "--workdir", "w"], "argument --model: invalid choice"),
        (["train", "--model", "resnet18"], "required: --workdir"),
        (["train", "--model", "resnet18", "--workdir", "w", "--epochs", "0"], "--epochs"),
        (["train", "--model", "resnet18", "--workdir", "w", "--dataset", "mnist"], "mnist"),
        (["prune", "--checkpoint", "c", "--out", "o", "--sparsity", "1.5"], "[0, 1)"),
        (["prune", "--checkpoint", "c", "--out", "o", "--sparsity", "-0.1"], "[0, 1)"),
        (["prune", "--checkpoint", "c", "--out", "o", "--sparsity", "half"], "'half'"),
        (["prune", "--checkpoint", "c", "--out", "o", "--sparsity", "0.5", "--groups", "a"], "0,3"),
        (["prune", "--checkpoint", "c", "--out", "o", "--sparsity", "0.5", "--solver", "x"], "x"),
        (["datafree", "--checkpoint", "c", "--out", "o", "--sparsities", "0.1,1"], "[0, 1)"),
        (["datafree", "--checkpoint", "c", "--out", "o", "--importances", "l1,l3"], "'l3'"),
        (["datafree", "--checkpoint", "c", "--out", "o", "--methods", "fuse"], "'fuse'"),
        (["demo", "--width-multiplier", "0"], "positive number"),
    ],
)
def test_bad_arguments_are_named(capsys, argv, expected):
    assert expected in _error(capsys, argv)


def test_sparsity_error_names_the_problem(capsys):
    line = _error(capsys, ["prune", "--checkpoint", "c", "--out", "o", "--sparsity", "1.5"])
    assert line == "ifjax: error: argument --sparsity: sparsity must be in [0, 1), got '1.5'"


@pytest.mark.parametrize("command", ["eval", "finetune", "datafree", "prune"])
def test_missing_checkpoint_is_named(capsys, tmp_path, command):
    argv = [command, "--checkpoint", str(tmp_path / "nowhere")]
    argv += {
        "eval": [],
        "finetune": ["--workdir", str(tmp_path / "w")],
        "datafree": ["--out", str(tmp_path / "o")],
        "prune": ["--out", str(tmp_path / "o"), "--sparsity", "0.5"],
    }[command]
    line = _error(capsys, argv)
    assert f"no checkpoint at {tmp_path / 'nowhere'}" in line


def test_unknown_group_index_is_named(capsys, checkpoint, tmp_path):
    argv = ["prune", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    line = _error(capsys, argv + ["--sparsity", "0.5", "--groups", "0,9"])
    assert line == "ifjax: error: unknown group 9: the model has groups 0..7"
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten(capsys, checkpoint, tmp_path):
    (tmp_path / "o").mkdir()
    argv = ["prune", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    line = _error(capsys, argv + ["--sparsity", "0.5"])
    assert "exists; pass --overwrite" in line


def test_unavailable_dataset_is_named(capsys, checkpoint):
    line = _error(capsys, ["eval", "--checkpoint", str(checkpoint), "--dataset", "cifar100"])
    assert "cifar100 is not prepared" in line


def test_traceback_flag_reraises(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        cli.main(OFF + ["--traceback", "eval", "--checkpoint", str(tmp_path / "nowhere")])


def test_help_exits_zero(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "prune", "finetune", "datafree", "demo"):
        assert command in out
    assert cli.main(["datafree", "--help"]) == 0
    assert "lamp_released" in capsys.readouterr().out


def test_compilation_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("IFJAX_COMPILATION_CACHE", str(tmp_path / "c"))
    assert jobs.default_compilation_cache() == tmp_path / "c"
    monkeypatch.setenv("IFJAX_COMPILATION_CACHE", "off")
    assert jobs.default_compilation_cache() is None
    monkeypatch.delenv("IFJAX_COMPILATION_CACHE")
    assert jobs.default_compilation_cache() == Path("~/.cache/ifjax/jax").expanduser()


def test_demo_settings_are_checked():
    with pytest.raises(ValueError, match=r"unknown demo settings \['colour'\]"):
        jobs.demo("unused", colour="red")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records (in order) jax.distributed.initialize and pipeline calls, running neither."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(("init", kw)))
    for name in ("split_train", "fap", "paf"):
        fake = lambda model, dataset, name=name, **kw: calls.append((name, kw))
        monkeypatch.setattr(pipelines, name, fake)
    return calls


@pytest.mark.parametrize("command", ["split-train", "fap", "paf"])
def test_split_pipelines_take_overwrite_and_distributed_flags(calls, capsys, command):
    hosts = ["--coordinator-address", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1"]
    argv = [command, "--workdir", "w", "--overwrite", "--distributed", *hosts]
    assert cli.main(OFF + argv) == 0
    assert "report: w/report.md" in capsys.readouterr().out
    init = dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    assert calls[0] == ("init", init)  # before the pipeline touches a device
    assert calls[1][0] == command.replace("-", "_") and calls[1][1]["overwrite"] is True
    calls.clear()
    assert cli.main(OFF + [command, "--workdir", "w"]) == 0
    assert [name for name, _ in calls] == [command.replace("-", "_")]
    assert calls[0][1]["overwrite"] is False and calls[0][1]["workdir"] == "w"
    assert calls[0][1]["label_smoothing"] == 0.0
    calls.clear()
    assert cli.main(OFF + [command, "--workdir", "w", "--label-smoothing", "0.1"]) == 0
    assert calls[0][1]["label_smoothing"] == 0.1


def test_distributed_without_flags_leaves_them_to_jax(calls):
    assert cli.main(OFF + ["fap", "--workdir", "w", "--distributed"]) == 0
    assert calls[0] == ("init", {})


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num-processes", "2"], "--num-processes given without --distributed"),
        (["--distributed", "--num-processes", "2", "--process-id", "2"], "below --num-processes"),
        (["--distributed", "--process-id", "-1"], "non-negative integer"),
        (["--distributed", "--num-processes", "0"], "positive integer"),
    ],
)
def test_bad_distributed_flags_are_named(calls, capsys, flags, expected):
    assert expected in _error(capsys, ["paf", "--workdir", "w", *flags])
    assert calls == []


def test_failed_distributed_start_is_one_clear_line(capsys, monkeypatch):
    def initialize(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    line = _error(capsys, ["fap", "--workdir", "w", "--distributed", "--num-processes", "2"])
    assert "jax.distributed.initialize(num_processes=2) failed" in line
    assert "coordinator_address should be defined" in line and "--coordinator-address" in line


def test_vit_training_and_pruning_options_reach_the_jobs(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(jobs, "train", lambda **kw: seen.setdefault("train", kw) and None)
    monkeypatch.setattr(cli, "_report_fit", lambda result: None)
    argv = ["train", "--model", "vit", "--workdir", "w", "--optimizer", "adamw", "--lr", "1e-3"]
    assert cli.main(OFF + argv + ["--weight-decay", "0.05", "--schedule", "fast"]) == 0
    train = seen["train"]
    assert (train["model"], train["optimizer"], train["peak_lr"]) == ("vit", "adamw", 1e-3)
    assert (train["weight_decay"], train["schedule"]) == (0.05, "fast")
    assert seen.pop("train")["label_smoothing"] == 0.0
    assert cli.main(OFF + argv + ["--label-smoothing", "0.1"]) == 0
    assert seen["train"]["label_smoothing"] == 0.1

    def prune(checkpoint, out, **kw):
        seen["prune"] = kw
        raise ValueError("stop here")

    monkeypatch.setattr(jobs, "prune_checkpoint", prune)
    argv = ["prune", "--checkpoint", "c", "--out", "o", "--sparsity", "0.5", "--groups", "heads"]
    assert "stop here" in _error(capsys, argv) and seen["prune"]["groups"] == "heads"
    bad = ["train", "--model", "vit", "--workdir", "w", "--optimizer", "lion"]
    assert "--optimizer: invalid choice" in _error(capsys, bad)
    bad = ["train", "--model", "vit", "--workdir", "w", "--label-smoothing", "1"]
    assert "--label-smoothing" in _error(capsys, bad)


def test_round_to_reaches_the_pruned_widths(capsys, checkpoint, tmp_path):
    argv = ["prune", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    argv += ["--sparsity", "0.4", "--groups", "0,1", "--method", "default"]
    assert cli.main(OFF + argv + ["--round-to", "8"]) == 0
    pruned = jobs.restore(tmp_path / "o")
    widths = [pruned.model.cfg[i] for i in (-2, -3)]  # the two last convolutions: 32 each
    assert widths == [16, 16]  # 32 * 0.6 = 19.2 -> the nearest multiple of 8
    assert pruned.info["history"][-1]["round_to"] == 8
    line = _error(capsys, argv + ["--round-to", "64", "--out", str(tmp_path / "p")])
    assert "round_to is too large for this group" in line and "group 0 (32 channels" in line
    assert "must be a positive integer" in _error(capsys, argv + ["--round-to", "0"])


def test_prune_recalibrates_batchnorm_on_training_images(checkpoint, tmp_path, monkeypatch):
    import ifjax
    from tests.fake_data import write_cifar_zip

    zip_path = write_cifar_zip(tmp_path / "cifar10-jpeg.zip", per_class=10)
    monkeypatch.setenv("IFJAX_CIFAR10_ZIP", str(zip_path))
    argv = ["prune", "--checkpoint", str(checkpoint), "--sparsity", "0.5", "--groups", "0,1"]
    argv += ["--method", "default", "--seed", "3"]
    assert cli.main(OFF + argv + ["--out", str(tmp_path / "plain")]) == 0
    assert cli.main(OFF + argv + ["--out", str(tmp_path / "re"), "--recalibrate", "40"]) == 0
    plain, recalibrated = jobs.restore(tmp_path / "plain"), jobs.restore(tmp_path / "re")
    assert recalibrated.info["history"][-1]["recalibrate"] == 40
    assert "recalibrate" not in plain.info["history"][-1]
    jax.tree.map(
        np.testing.assert_array_equal, recalibrated.variables["params"], plain.variables["params"]
    )
    # the same 40 images (a random subset drawn with the seed) through the library
    images = jobs.load_split("cifar10", "train", subset=40, seed=3)
    batches = list(data_lib.batches(images, 128, shuffle=False, augment=False))
    expected = ifjax.recalibrate_batchnorm(plain.model, plain.variables, batches)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        recalibrated.variables["batch_stats"],
        expected["batch_stats"],
    )
    stats = recalibrated.variables["batch_stats"]["bn0"]["mean"]  # folded: zeros before
    assert not np.allclose(stats, plain.variables["batch_stats"]["bn0"]["mean"])


# every non-default option of `ifjax prune` (no data needed: no taylor, no --evaluate)
_PRUNE_OPTIONS = {
    "intra_fusion": (
        ["--groups", "0,2,5", "--sparsity", "0.5", "--importance", "lamp"]
        + ["--marginals", "importance", "--target", "centroids"]
        + ["--map-normalization", "row_average", "--solver", "sinkhorn", "--epsilon", "0.01"]
        + ["--round-to", "2"],
        dict(groups=[0, 2, 5], sparsity=0.5, method="intra_fusion", importance="lamp",
             marginals="importance", target="centroids", map_normalization="row_average",
             solver="sinkhorn", epsilon=0.01, round_to=2),
    ),
    "default": (
        ["--method", "default", "--sparsity", "0.4", "--importance", "random", "--seed", "3"]
        + ["--round-to", "2"],
        dict(groups="all", sparsity=0.4, method="default", importance="random", round_to=2),
    ),
}  # fmt: skip


@pytest.mark.parametrize("method", ["intra_fusion", "default"])
def test_prune_options_equal_the_library_given_the_same(capsys, checkpoint, tmp_path, method):
    """`ifjax prune` with every non-default option saves what ifjax.prune gives with the
    same options, and records them; with the defaults the result differs."""
    argv, options = _PRUNE_OPTIONS[method]
    out = tmp_path / "o"
    assert cli.main(OFF + ["prune", "--checkpoint", str(checkpoint), "--out", str(out), *argv]) == 0
    printed = capsys.readouterr().out
    restored, pruned = jobs.restore(checkpoint), jobs.restore(out)
    options = dict(options)
    groups, importance = options.pop("groups"), options["importance"]
    seed = 3 if method == "default" else 0
    model, variables, plans = ifjax.prune(
        restored.model,
        restored.variables,
        groups,
        example_input=restored.example_input,
        key=jax.random.key(seed),
        **options,
    )
    assert pruned.model == model
    assert_trees_equal(pruned.variables, variables, rtol=1e-6, atol=1e-7)
    step = pruned.info["history"][-1]
    assert (step["method"], step["importance"], step["seed"]) == (method, importance, seed)
    assert step["round_to"] == options["round_to"]
    for name in ("marginals", "target", "map_normalization", "solver", "epsilon"):
        assert step.get(name) == options.get(name), name
    widths = [int(p.keep.shape[0]) for p in plans]
    assert all(w % options["round_to"] == 0 for w in widths)
    assert f"at sparsity {options['sparsity']} ({method}, {options['importance']})" in printed
    # the options matter: the method with the library's defaults gives another model
    plain = ifjax.prune(
        restored.model,
        restored.variables,
        groups,
        sparsity=options["sparsity"],
        method=method,
        example_input=restored.example_input,
    )[1]
    leaves = zip(jax.tree.leaves(plain), jax.tree.leaves(pruned.variables), strict=True)
    assert jax.tree.structure(plain) != jax.tree.structure(pruned.variables) or any(
        np.shape(a) != np.shape(b) or not np.allclose(a, b) for a, b in leaves
    )


def test_split_pipelines_take_recalibrate(calls, capsys):
    assert cli.main(OFF + ["fap", "--workdir", "w", "--recalibrate", "200"]) == 0
    assert calls[0][1]["recalibrate"] == 200
    assert cli.main(OFF + ["paf", "--workdir", "w"]) == 0
    assert calls[1][1]["recalibrate"] == 0
    assert "non-negative integer" in _error(
        capsys, ["paf", "--workdir", "w", "--recalibrate", "-1"]
    )


def test_datafree_recalibrates_every_pruned_model(capsys, checkpoint, tmp_path, monkeypatch):
    """``datafree --recalibrate 40``: the cell is the physically pruned model with its
    BatchNorm re-estimated on 40 random training images; the CSV records it."""
    from tests.fake_data import write_cifar_zip

    zip_path = write_cifar_zip(tmp_path / "cifar10-jpeg.zip", per_class=10)
    monkeypatch.setenv("IFJAX_CIFAR10_ZIP", str(zip_path))
    argv = ["datafree", "--checkpoint", str(checkpoint), "--groups", "0", "--sparsities", "0.5"]
    argv += ["--importances", "l1", "--methods", "default", "--seed", "2"]
    assert cli.main(OFF + argv + ["--out", str(tmp_path / "re"), "--recalibrate", "40"]) == 0
    (row,) = list(csv.DictReader(open(tmp_path / "re" / "datafree.csv")))
    assert row["recalibrate"] == "40"
    restored = jobs.restore(checkpoint)
    model, pruned, _ = ifjax.prune(
        restored.model,
        restored.variables,
        [0],
        sparsity=0.5,
        method="default",
        example_input=restored.example_input,
    )
    batches = jobs.recalibration_batches("cifar10", 40, seed=2)
    pruned = ifjax.recalibrate_batchnorm(model, pruned, batches)
    test_set = jobs.load_split("cifar10", "test")
    logits = np.asarray(model.apply(pruned, data_lib.normalize(test_set.images), train=False))
    expected = 100 * np.mean(np.argmax(logits, -1) == test_set.labels)
    assert float(row["top1"]) == pytest.approx(expected, abs=1e-4)
    line = _error(capsys, argv + ["--out", str(tmp_path / "o"), "--recalibrate", "101"])
    assert line.endswith(
        "recalibrate must be in [1, 100] (the training images of cifar10), got 101"
    )


@pytest.mark.parametrize(
    "options, job",
    [
        (commands.TrainOptions(model="vgg11_bn", workdir="w"), jobs.train),
        (commands.EvalOptions(checkpoint="c"), jobs.evaluate_checkpoint),
        (commands.PruneOptions(checkpoint="c", out="o", sparsity=0.5), jobs.prune_checkpoint),
        (commands.FinetuneOptions(checkpoint="c", workdir="w"), jobs.finetune),
        (commands.DatafreeOptions(checkpoint="c", out="o"), jobs.datafree),
    ],
)
def test_command_options_are_their_jobs_arguments_with_its_defaults(options, job):
    """Each command's dataclass holds its job's keyword arguments, defaults included."""
    parameters = inspect.signature(job).parameters
    arguments = options.arguments()
    assert set(arguments) <= set(parameters)
    assert set(parameters) - set(arguments) <= {"progress"}
    for name, value in arguments.items():
        default = parameters[name].default
        if default is not inspect.Parameter.empty and name != "options":
            assert value == default or tuple(value) == tuple(default), name
