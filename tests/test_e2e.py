"""End to end through the command line on a tiny CIFAR-10-like JPEG zip.

train (stopped by --max-steps, then resumed) -> eval -> prune -> eval -> finetune, and the
data-free sweep, all through ``train.cli.main``. Values are checked against independent
computations: the resumed model equals an uninterrupted run, printed accuracies equal
accuracies computed by hand, and sweep cells equal physically pruned models.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from tree_asserts import assert_trees_equal

import ifjax
from tests.conftest import require_shared
from train import cli, data, jobs, paper

CLASSES = ("airplane", "bird", "cat", "ship")
MODEL_ARGS = ["--model", "vgg11_bn", "--width-multiplier", "0.0625", "--dataset", "cifar10_jpeg"]
FIT_ARGS = ["--epochs", "2", "--batch-size", "16", "--schedule", "fast", "--seed", "1"]


def _jpeg(rng: np.random.Generator, colour: np.ndarray) -> bytes:
    pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A zip of 4 classes (a colour each, plus noise): 16 train and 8 test images each."""
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    colours = rng.uniform(40, 215, (len(CLASSES), 3))
    with zipfile.ZipFile(root / "tiny.zip", "w") as archive:
        for split, count in (("train", 16), ("test", 8)):
            for name, colour in zip(CLASSES, colours, strict=True):
                for i in range(count):
                    archive.writestr(f"cifar10/{split}/{name}/{i:04d}.jpg", _jpeg(rng, colour))
    return {"root": root, "zip": root / "tiny.zip", "data": root / "tfds"}


def _data_args(env: dict[str, Path]) -> list[str]:
    return ["--zip-path", str(env["zip"]), "--data-dir", str(env["data"])]


def _run(*argv: str) -> str:
    """Runs the command line, asserts success and returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["--compilation-cache", "off", *argv])
    assert status == 0, out.getvalue()
    return out.getvalue()


def _top1_by_hand(model, variables, env) -> float:
    test = data.load_dataset("cifar10_jpeg", "test", data_dir=env["data"], zip_path=env["zip"])
    logits = model.apply(variables, jnp.asarray(data.normalize(test.images)), train=False)
    return 100 * float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test.labels))


@pytest.fixture(scope="module")
def trained(env) -> Path:
    """Trains with a stop after 5 of 8 steps, resumes; returns the workdir."""
    workdir = env["root"] / "train"
    args = ["train", *MODEL_ARGS, *FIT_ARGS, *_data_args(env), "--workdir", str(workdir)]
    stopped = _run(*args, "--max-steps", "5")
    assert "stopped after 1 complete epochs" in stopped
    assert not (workdir / "model").exists()
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert saved == ["step_000000004", "step_000000005"]  # end of epoch 1, the stop
    resumed = _run(*args)
    assert f"model saved to {workdir / 'model'}" in resumed
    return workdir


def test_resumed_training_equals_an_uninterrupted_run(trained, env):
    workdir = env["root"] / "uninterrupted"
    _run("train", *MODEL_ARGS, *FIT_ARGS, *_data_args(env), "--workdir", str(workdir))
    resumed, uninterrupted = jobs.restore(trained / "model"), jobs.restore(workdir / "model")
    assert_trees_equal(resumed.variables, uninterrupted.variables)
    assert resumed.metadata == uninterrupted.metadata
    assert resumed.metadata["model"] == "vgg11_bn"
    assert resumed.metadata["training"]["train_images"] == 64
    with open(trained / "metrics.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1", "2"]


def test_eval_prints_the_accuracy_of_the_checkpoint(trained, env):
    out = _run("eval", "--checkpoint", str(trained / "model"), *_data_args(env))
    restored = jobs.restore(trained / "model")
    expected = _top1_by_hand(restored.model, restored.variables, env)
    assert f"top-1: {expected:.2f}% " in out
    assert "32 test images of cifar10_jpeg" in out
    assert restored.metadata["test_top1"] == pytest.approx(expected)
    subset = _run(
        "eval", "--checkpoint", str(trained / "model"), "--test-subset", "12", *_data_args(env)
    )
    assert "12 test images of cifar10_jpeg" in subset


def _loss_by_hand(model, variables, env) -> float:
    """Mean cross-entropy over the training images (not augmented)."""
    train = data.load_dataset("cifar10_jpeg", "train", data_dir=env["data"], zip_path=env["zip"])
    logits = model.apply(variables, jnp.asarray(data.normalize(train.images)), train=False)
    labels = jnp.asarray(train.labels)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


def _printed(label: str, out: str) -> float:
    return float(re.search(rf"{label}: ([0-9.]+)%", out).group(1))


def test_prune_eval_finetune(trained, env):
    pruned_dir, tuned_dir = env["root"] / "pruned", env["root"] / "tuned"
    out = _run(
        "prune",
        "--checkpoint",
        str(trained / "model"),
        "--groups",
        "0,3",
        "--sparsity",
        "0.5",
        "--importance",
        "taylor",
        "--evaluate",
        "--out",
        str(pruned_dir),
        *_data_args(env),
    )
    assert ": conv4 32->16, conv7 32->16\n" in out  # groups 3 and 0 of VGG11 (width 1/16)
    before, after = (int(n) for n in re.search(r"parameters: (\d+) -> (\d+)", out).groups())
    assert 0.5 < after / before < 0.8
    pruned = jobs.restore(pruned_dir)
    assert _printed("after", out) == round(_top1_by_hand(pruned.model, pruned.variables, env), 2)
    (step,) = pruned.info["history"]
    assert step["operation"] == "prune" and step["method"] == "intra_fusion"
    assert (step["groups"], step["sparsity"], step["importance"]) == ([0, 3], 0.5, "taylor")
    assert step["solver"] == "exact" and step["map_normalization"] == "reference"
    evaluated = _run("eval", "--checkpoint", str(pruned_dir), *_data_args(env))
    assert _printed("top-1", evaluated) == _printed("after", out)

    args = ["finetune", "--checkpoint", str(pruned_dir), "--workdir", str(tuned_dir)]
    out = _run(*args, "--epochs", "2", "--batch-size", "16", *_data_args(env))
    tuned = jobs.restore(tuned_dir / "model")
    assert [s["operation"] for s in tuned.info["history"]] == ["prune", "finetune"]
    assert tuned.model == pruned.model  # same pruned widths
    assert _printed("test top-1", out) == round(tuned.metadata["test_top1"], 2)
    # fine-tuning trained: every kernel moved, and the training loss went down
    kernels = lambda tree: {
        path: leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree["params"])
        if path[-1].key == "kernel"
    }
    before, after = kernels(pruned.variables), kernels(tuned.variables)
    assert before.keys() == after.keys() and len(before) == 9
    assert all(np.abs(np.asarray(after[p]) - np.asarray(before[p])).max() > 1e-4 for p in before)
    loss_before = _loss_by_hand(pruned.model, pruned.variables, env)
    loss_after = _loss_by_hand(tuned.model, tuned.variables, env)
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)


def test_datafree_writes_its_csv_markdown_and_plot(trained, env):
    out_dir = env["root"] / "datafree"
    out = _run(
        "datafree",
        "--checkpoint",
        str(trained / "model"),
        "--groups",
        "0,7",
        "--sparsities",
        "0,0.5",
        "--importances",
        "l1,taylor",
        "--out",
        str(out_dir),
        *_data_args(env),
    )
    with open(out_dir / "datafree.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 2 * 2 * 2
    assert {(r["model"], r["dataset"]) for r in rows} == {("vgg11_bn", "cifar10_jpeg")}
    assert {(r["group"], r["sparsity"]) for r in rows} == {
        (g, s) for g in ("0", "7") for s in ("0.0", "0.5")
    }
    has_paper = paper.paper_datafree("vgg11_bn", "cifar10_jpeg") is not None
    assert ("paper_gain" in rows[0]) == has_paper
    restored = jobs.restore(trained / "model")
    base = _top1_by_hand(restored.model, restored.variables, env)
    for row in rows:
        assert float(row["base_top1"]) == pytest.approx(base, abs=1e-4)
        if row["sparsity"] == "0.0":
            assert row["top1"] == row["base_top1"]
    for method in ("default", "intra_fusion"):
        (cell,) = [
            r
            for r in rows
            if (r["group"], r["sparsity"], r["importance"], r["method"])
            == ("7", "0.5", "l1", method)
        ]
        model, variables, _ = ifjax.prune(
            restored.model,
            restored.variables,
            7,
            sparsity=0.5,
            method=method,
            example_input=restored.example_input,
        )
        assert float(cell["top1"]) == pytest.approx(_top1_by_hand(model, variables, env), abs=1e-4)
    table = (out_dir / "datafree.md").read_text()
    assert "| group | importance |  | 0% | 50% |" in table and table in out
    assert "| 7 | taylor | gain |" in table
    assert (out_dir / "datafree.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "datafree_gain.png").exists() == has_paper


@pytest.mark.slow
def test_demo_runs_in_under_15_minutes(tmp_path):
    """The real demo on the real CIFAR-10 zip (deselected by default; ``-m slow``)."""
    require_shared("data")
    start = time.perf_counter()
    out = _run("demo", "--workdir", str(tmp_path / "demo"))
    assert time.perf_counter() - start < 15 * 60
    base = _printed("test top-1", out)
    assert base > 60.0
    with open(tmp_path / "demo" / "datafree" / "datafree.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 * len(jobs.DEMO["sparsities"]) * 2
    assert all(float(r["base_top1"]) == pytest.approx(base, abs=0.02) for r in rows)
    assert (tmp_path / "demo" / "datafree" / "datafree.png").exists()


# paf's CLI run is slow-marked to keep CI under 15 minutes: the PaF pipeline itself runs by
# default in tests/test_pipelines.py and tests/test_clients.py, the command line in fap's run
@pytest.mark.parametrize("command", ["fap", pytest.param("paf", marks=pytest.mark.slow)])
def test_split_data_pipelines_through_the_command_line(command, env, monkeypatch):
    monkeypatch.setenv("IFJAX_CIFAR10_ZIP", str(env["zip"]))
    workdir = env["root"] / command
    out = _run(
        command, "--model", "vgg11_bn", "--width-multiplier", "0.0625",
        "--dataset", "cifar10_jpeg", "--data-dir", str(env["data"]), "--k", "2",
        "--epochs", "1", "--batch-size", "8", "--schedule", "fast", "--sparsity", "0.5",
        "--prune-steps", "1", "--epochs-per-step", "1", "--finetune-epochs", "1",
        "--workdir", str(workdir),
    )  # fmt: skip
    assert f"report: {workdir}/report.md" in out
    with open(workdir / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    stages = {  # (stage, models): paf prunes each of the k=2 replicas before fusing
        "fap": [("split_train", 2), ("fuse", 1), ("fusion_finetune", 1), ("prune_step_1", 1)],
        "paf": [("split_train", 2), ("prune_step_1", 2), ("fuse", 1)],
    }[command] + [("finetune", 1)]
    expected = [(command, *s) for s in stages]
    expected += [("baseline", s, 1) for s in ("train", "prune_step_1", "finetune")]
    assert [(r["pipeline"], r["stage"], int(r["models"])) for r in rows] == expected
    # top-1 is a fraction in the CSV (the mean over the models), a percentage in the markdown
    markdown = (workdir / "report.md").read_text()
    for row in rows:
        top1, each = float(row["top1"]), json.loads(row["top1_each"])
        assert len(each) == int(row["models"])
        assert 0.0 <= top1 <= 1.0 and top1 == pytest.approx(np.mean(each))
        assert f"| {row['pipeline']} | {row['stage']} | {row['models']} | {100 * top1:.2f} |" in (
            markdown
        )
    # the saved final model's accuracy, computed by hand (percent), is the last row's
    final = jobs.restore(workdir / "model")
    hand = _top1_by_hand(final.model, final.variables, env)
    assert float(rows[len(stages) - 1]["top1"]) == pytest.approx(hand / 100, abs=1e-6)
    assert int(rows[len(stages) - 1]["params"]) == sum(
        np.size(x) for x in jax.tree.leaves(final.variables["params"])
    )


def test_split_train_argument_errors_are_one_line(capsys):
    assert cli.main(["fap", "--workdir", "x", "--sparsity", "1.2"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
