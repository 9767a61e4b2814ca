"""reports/fullwidth.py (issue 20) at tiny scale, GPU packaging and unpacking included, and
the pieces it adds to the library: the zip read without tfds, batches made on the device,
mixed-precision training steps."""

from __future__ import annotations

import importlib.util
import io
import json
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from models.registry import create_model, init_variables
from tests.fake_data import write_cifar_zip
from train import data as data_lib
from train import training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_zip(tmp_path_factory):
    return write_cifar_zip(tmp_path_factory.mktemp("zip") / "cifar10-jpeg.zip", per_class=20)


@pytest.fixture(scope="module")
def fullwidth():
    sys.path.insert(0, str(ROOT / "reports"))
    spec = importlib.util.spec_from_file_location("fullwidth", ROOT / "reports" / "fullwidth.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fullwidth"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def device_run(fullwidth):
    import fullwidth_device  # reports/fullwidth_device.py, beside fullwidth

    return fullwidth_device


# --------------------------------------------------------------------------- data


def test_zip_and_packed_decode_to_the_same_pixels_in_name_order(cifar_zip, tmp_path):
    test = data_lib.read_cifar10_zip("test", cifar_zip)
    assert test.images.shape == (200, 32, 32, 3) and test.images.dtype == np.uint8
    assert list(test.labels) == [c for c in range(10) for _ in range(20)]
    with zipfile.ZipFile(cifar_zip) as archive:  # example 21 is class 1's second file
        with Image.open(io.BytesIO(archive.read("cifar10/test/automobile/0001.jpg"))) as image:
            np.testing.assert_array_equal(test.images[21], np.asarray(image))
    packed = data_lib.pack_cifar10(tmp_path / "cifar10.npz", cifar_zip)
    for split in ("train", "test"):
        a = data_lib.read_cifar10_zip(split, cifar_zip)
        b = data_lib.read_cifar10_zip(split, packed)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    few = data_lib.read_cifar10_zip("train", cifar_zip, per_class=3)
    assert list(few.labels) == [c for c in range(10) for _ in range(3)]


def test_packed_file_errors_name_the_problem(cifar_zip, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data_lib.read_cifar10_zip("train", tmp_path / "missing.zip")
    with pytest.raises(ValueError, match="split must be"):
        data_lib.read_cifar10_zip("validation", cifar_zip)
    packed = data_lib.pack_cifar10(tmp_path / "p.npz", cifar_zip, per_class=2)
    with np.load(packed) as arrays:
        broken = dict(arrays)
    broken["test_jpeg"] = broken["test_jpeg"][:-10]  # a truncated transfer
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(ValueError, match="corrupt"):
        data_lib.read_cifar10_zip("test", tmp_path / "broken.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a packed CIFAR-10"):
        data_lib.read_cifar10_zip("test", tmp_path / "other.npz")


def test_data_layer_imports_without_tensorflow_datasets():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow_datasets':\n"
        "            raise ModuleNotFoundError('no tfds here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import train.data, train.sweep, train.training, train.jobs\n"
        "sys.path.insert(0, 'reports')\n"
        "import fullwidth\n"
        "assert 'tensorflow_datasets' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_device_batches_are_crops_and_flips_of_their_examples_and_resume_exactly(cifar_zip):
    dataset = data_lib.read_cifar10_zip("test", cifar_zip)
    loader = data_lib.DeviceBatches(dataset, 32, seed=3)
    assert loader.steps_per_epoch == 6
    epoch = list(loader(1))
    assert len(epoch) == 6
    np.testing.assert_array_equal(list(loader(1, start_step=4))[0]["image"], epoch[4]["image"])
    assert not np.array_equal(list(loader(2))[0]["image"], epoch[0]["image"])
    order = data_lib.epoch_order(len(dataset), shuffle=True, seed=3, epoch=1)[:32]
    np.testing.assert_array_equal(epoch[0]["label"], dataset.labels[order])
    padded = np.pad(data_lib.normalize(dataset.images[order]), ((0, 0), (4, 4), (4, 4), (0, 0)))
    padded[:, :4] = padded[:, -4:] = padded[:, :, :4] = padded[:, :, -4:] = data_lib.normalize(
        np.zeros((1, 1, 1, 3), np.uint8)
    )  # zero pixels normalise to -mean/std
    flips = 0
    for image, source in zip(np.asarray(epoch[0]["image"]), padded, strict=True):
        crops = [
            (r, c, f)
            for r in range(9)
            for c in range(9)
            for f in (False, True)
            if np.allclose(
                image,
                source[r : r + 32, c : c + 32][:, ::-1] if f else source[r : r + 32, c : c + 32],
                atol=1e-5,
            )
        ]
        assert crops, "an augmented image is no crop (or mirrored crop) of its example"
        flips += all(f for _, _, f in crops)
    assert 0 < flips < 32  # both flipped and unflipped images occur
    with pytest.raises(ValueError, match="batch_size"):
        data_lib.DeviceBatches(dataset, 0)


# --------------------------------------------------------------------------- training


def test_mixed_precision_step_keeps_float32_state_and_follows_the_float32_step():
    model = create_model("vgg11_bn", 10, 0.0625)
    variables = init_variables(model, 0)
    optimizer = training.make_optimizer("fast", 10, 1)
    state = training.create_train_state(model, variables, optimizer)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    }
    full, full_metrics = training.train_step(state, batch, model=model, optimizer=optimizer)
    mixed, mixed_metrics = training.train_step(
        state, batch, model=model, optimizer=optimizer, compute_dtype="bfloat16"
    )
    for leaf in jax.tree.leaves((mixed.params, mixed.batch_stats, mixed.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32)
    assert abs(float(mixed_metrics["loss"]) - float(full_metrics["loss"])) < 0.05
    moved_full = jax.tree.map(lambda a, b: a - b, full.params, state.params)
    moved_mixed = jax.tree.map(lambda a, b: a - b, mixed.params, state.params)
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(moved_full)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(moved_mixed)])
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.95  # same direction
    assert not np.array_equal(a, b)  # and computed in another precision


# --------------------------------------------------------------------------- the command


def test_weights_travel_in_pieces_and_corruption_is_caught(fullwidth, device_run, tmp_path):
    model = create_model("vgg11_bn", 10, 0.125)
    variables = init_variables(model, 0)
    path = fullwidth.save_weights(tmp_path / "w.npz", variables)
    pieces = fullwidth.split_file(path, tmp_path, limit=50_000)
    assert len(pieces) == -(-path.stat().st_size // 50_000) > 2
    joined = device_run.join_parts(tmp_path, "w.npz", tmp_path / "joined" / "w.npz")
    restored = fullwidth.load_weights(joined)
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    pieces[-1].unlink()  # one piece lost on the way
    device_run.join_parts(tmp_path, "w.npz", tmp_path / "joined" / "w.npz")
    with pytest.raises(Exception):  # noqa: B017 - numpy's zip reader names the damage
        fullwidth.load_weights(tmp_path / "joined" / "w.npz")
    with pytest.raises(FileNotFoundError, match="results.zip"):
        device_run.unpack(tmp_path / "joined", tmp_path / "runs")


def _device_argv(command: str, out: Path, data: Path, runs: Path, deadline=None) -> list[str]:
    """A planned device command's arguments of reports/reproduce.py, run here at tiny scale
    (``--tiny`` wins over ``--recipe gpu``) with this test's folders."""
    python = command.split("python3 reports/reproduce.py ", 1)[1].split(" 2>&1")[0]
    argv = shlex.split(python.replace("$OUT", str(out)).replace(".device/cifar10.npz", str(data)))
    if deadline is not None:
        argv[argv.index("--deadline-s") + 1] = str(deadline)
    return [*argv, "--tiny", "--runs", str(runs)]


def test_fullwidth_tiny_end_to_end_with_device_packaging(
    fullwidth, device_run, cifar_zip, tmp_path, monkeypatch
):
    """The whole command at tiny scale through its command line: prepare the device folder,
    run the two planned device commands as a GPU session would (exporting to OUT folders),
    unpack what came back, write the reports."""
    import reproduce  # reports/reproduce.py, the command line

    monkeypatch.setenv("IFJAX_COMPILATION_CACHE", "off")
    cli = lambda *argv: reproduce.main(["fullwidth", "--tiny", *map(str, argv)])
    device = tmp_path / "device"
    cli("--no-wheels", "--data", cifar_zip, "--runs", tmp_path / "none_yet",
        "--device-run", "prepare", device)  # fmt: skip
    plan = json.loads((device / "plan.json").read_text())
    assert plan["fits"] and plan["packed_data_bytes"] < cifar_zip.stat().st_size
    # nothing measured yet: ResNet18 first (none of it runs on a CPU), trained by the
    # first command, its Table 1 and sweep continued by the second, the benches there too
    assert list(plan["commands"]) == ["1", "2"]
    assert _stages(plan["commands"]) == [
        "train table1 datafree",
        "table1 replicas datafree bench",
    ]
    assert all("--models resnet18 " in c for c in plan["commands"].values())
    assert "--bench-models vgg11_bn resnet18" in plan["commands"]["2"]
    for command in plan["commands"].values():
        assert "--recipe gpu" in command and "--out $OUT" in command and "pip install" in command
        assert f"--deadline-s {device_run.DEVICE_DEADLINE_S}" in command
        # the device's runs outside the tree the device tool copies there at every call
        assert f"--runs {device_run.DEVICE_RUNS} " in command
    assert plan["timeout_s"] > device_run.DEVICE_DEADLINE_S

    # the planned commands as a session runs them, on one machine kept warm: the first
    # trains and its deadline (0 here) cuts the rest; the second goes on with its weights
    device_runs, packed = tmp_path / "device_runs", device / "cifar10.npz"
    outs = [tmp_path / "OUT1", tmp_path / "OUT2"]
    reproduce.main(_device_argv(plan["commands"]["1"], outs[0], packed, device_runs, deadline=0))
    second = _device_argv(plan["commands"]["2"], outs[1], packed, device_runs, deadline=3600)
    reproduce.main(second)  # all of it (a shared CI machine may be slow)
    for out in outs:
        returned = sorted(p.name for p in out.iterdir())
        assert returned == ["resnet18.trained.npz.part0", "results.zip"]
        assert all(p.stat().st_size <= fullwidth.FILE_LIMIT for p in out.iterdir())
    with zipfile.ZipFile(outs[0] / "results.zip") as archive:
        assert not any("table1" in n or "datafree_" in n for n in archive.namelist())
    # on a fresh machine the second command finds no weights: it skips the model
    fresh = tmp_path / "OUT_fresh"
    cli("--models", "resnet18", "--stages", "table1", "datafree", "--data", packed,
        "--out", fresh, "--runs", tmp_path / "fresh_runs")  # fmt: skip
    with zipfile.ZipFile(fresh / "results.zip") as archive:
        assert archive.namelist() == []

    runs, reports = tmp_path / "runs", tmp_path / "reports"
    for returned in (*outs, fresh):  # the second is the same generation, merged
        cli("--runs", runs, "--reports", reports, "--data", cifar_zip,
            "--device-run", "unpack", returned)  # fmt: skip
    workdir = runs / "tiny" / "resnet18"
    assert sorted(p.name for p in (runs / "tiny").iterdir() if p.is_dir()) == ["resnet18"]
    recipe = fullwidth.RECIPES["tiny"]
    trained = json.loads((workdir / "train.json").read_text())
    assert trained["recipe"]["batch_size"] == recipe.batch_size
    assert 0 <= trained["test_top1"] <= 100 and trained["test_images"] == 200
    # the returned weights are the trained ones: same accuracy when evaluated here
    model = create_model("resnet18", 10, recipe.width)
    test = data_lib.read_cifar10_zip("test", cifar_zip)
    variables = fullwidth.load_weights(workdir / "trained.npz")
    top1 = 100 * training.evaluate(model, variables, fullwidth.sweep.eval_batch_list(test))["top1"]
    assert top1 == pytest.approx(trained["test_top1"], abs=1e-6)
    check = json.loads((workdir / "local_check.json").read_text())
    assert check["top1"] == pytest.approx(top1, abs=1e-6)

    rows = fullwidth._datafree_rows(workdir)
    cells = {(r["importance"], r["method"]) for r in rows}
    assert cells == {(i, m) for i in fullwidth.IMPORTANCES for m in fullwidth.METHODS}
    table1 = [json.loads(line) for line in (workdir / "table1.jsonl").open()]
    assert sorted(r["method"] for r in table1) == ["default", "intra_fusion"]
    assert all(r["params"] < r["dense_params"] for r in table1)
    bench = json.loads((runs / "tiny" / "bench.json").read_text())
    assert {(r["model"], r["framework"]) for r in bench} == {
        (m, f) for m in fullwidth.MODELS for f in ("ifjax", "torch")
    }
    ours = [r for r in bench if r["framework"] == "ifjax"]
    assert ours and all(r["images_per_second"] > 0 for r in ours)
    replicas = json.loads((runs / "tiny" / "replicas.json").read_text())
    assert {(r["k"], r["mode"]) for r in replicas} == {
        (k, m) for k in recipe.replicas for m in ("separate runs", "sequential", "vmap")
    }
    assert sum(r["auto"] for r in replicas) == len(recipe.replicas)  # one pick per k

    text = (reports / "fullwidth.md").read_text()  # written by unpack
    assert f"**{trained['test_top1']:.2f}%**" in text
    for heading in ("## Base models", "data-free pruning", "Table 1, pruned and fine-tuned"):
        assert heading in text
    assert "| l1 | Intra-Fusion (exact) | 1 |" in text  # one group x one sparsity
    gpu = (reports / "gpu.md").read_text()
    assert "| ResNet18 | 16 | float32 |" in gpu and "| VGG11-BN | 16 | float32 |" in gpu
    assert "| 2 | vmap |" in gpu
    assert (reports / "data" / "fullwidth_datafree_resnet18.csv").exists()

    # what a GPU session would still do: ResNet18 is complete (trained with the recipe,
    # Table 1 whole, so is its sweep), so are the benches unless PyTorch's rows failed
    # (no torch here); VGG11-BN never ran
    failed = any("error" in r for r in bench)
    work = device_run.device_work(runs, recipe)
    assert work == dict(
        models=["vgg11_bn"], stale=[], datafree_here=[], bench=failed, replicas=False
    )
    assert _stages(device_run.device_commands(work)) == [
        "train table1 datafree",
        "table1 datafree" + " bench" * failed,
    ]
    journal = workdir / "datafree_lamp.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:-1]))
    assert device_run.device_work(runs, recipe)["datafree_here"] == ["resnet18"]  # goes on here
    # whole results of an earlier recipe: trained again once nothing else needs the GPU
    older = dict(trained, recipe=dict(trained["recipe"], epochs=99))
    (workdir / "train.json").write_text(json.dumps(older))
    assert device_run.device_work(runs, recipe)["stale"] == ["resnet18"]
    alone = dict(models=[], stale=["resnet18"], datafree_here=[], bench=False, replicas=True)
    assert _stages(device_run.device_commands(alone)) == [
        "train table1 datafree",
        "table1 replicas datafree",
    ]
    assert device_run.device_commands(dict(alone, stale=[], replicas=False)) == {}

    # run again: every stage finds its results and does nothing new
    journals = lambda: [
        p.read_text() for p in sorted((device_runs / "tiny" / "resnet18").glob("*.jsonl"))
    ]
    before = journals()
    assert len(before) == len(fullwidth.IMPORTANCES) + 1  # the sweep's, one each, and Table 1
    fullwidth.run_stages(
        recipe, ["resnet18"], ["train", "datafree", "table1"], data_path=packed, runs=device_runs
    )
    assert journals() == before


def _stages(commands) -> list[str]:
    return [c.split("--stages ")[1].split(" --")[0] for c in commands.values()]


def test_deadline_leaves_work_for_the_next_run(fullwidth):
    assert fullwidth.Deadline(None).allows(1e9)
    assert not fullwidth.Deadline(10).allows(30)
    assert fullwidth.Deadline(100).allows(30)


def test_export_keeps_within_what_comes_back_and_unpack_replaces_a_generation(
    fullwidth, device_run, tmp_path, monkeypatch
):
    model = create_model("vgg11_bn", 10, 0.125)
    variables = init_variables(model, 0)
    root = tmp_path / "runs" / "gpu"
    for name in fullwidth.MODELS:
        fullwidth.save_weights(root / name / fullwidth.WEIGHTS, variables)
        (root / name / "train.json").write_text(json.dumps({"model": name}))
    size = (root / "vgg11_bn" / fullwidth.WEIGHTS).stat().st_size
    # room for one model's weights only
    monkeypatch.setattr(fullwidth, "TOTAL_LIMIT", int(1.5 * size) + fullwidth.RESERVED)
    monkeypatch.setattr(fullwidth, "FILE_LIMIT", size // 2 + 1)
    out = tmp_path / "OUT"
    fullwidth._export(root, out, fullwidth.MODELS)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["results.zip", "vgg11_bn.trained.npz.part0", "vgg11_bn.trained.npz.part1"]
    assert all(p.stat().st_size <= size // 2 + 1 for p in out.glob("*.part*"))
    # a command returns its own models only (a machine kept warm still holds the others)
    only = tmp_path / "OUT_vgg"
    fullwidth._export(root, only, ["vgg11_bn"])
    with zipfile.ZipFile(only / "results.zip") as archive:
        assert archive.namelist() == ["vgg11_bn/train.json"]
    runs = tmp_path / "local"
    device_run.unpack(out, runs)
    # the same generation again (a second command on a warm machine): merged, journals
    # keep the rows evaluated here meanwhile
    here = runs / "gpu" / "vgg11_bn" / "datafree_l1.jsonl"
    here.write_text('{"row": "evaluated here"}\n')
    (root / "vgg11_bn" / "datafree_l1.jsonl").write_text('{"row": "on the device"}\n')
    again = tmp_path / "OUT_again"
    fullwidth._export(root, again, ["vgg11_bn"])
    device_run.unpack(again, runs)
    assert sorted(p.name for p in (runs / "gpu").iterdir()) == ["resnet18", "vgg11_bn"]
    assert here.read_text() == '{"row": "evaluated here"}\n{"row": "on the device"}\n'
    # a generation trained anew replaces the present one, kept aside
    (runs / "gpu" / "vgg11_bn" / "train.json").write_text(json.dumps({"model": "earlier"}))
    (runs / "gpu" / "vgg11_bn" / "extra.jsonl").write_text("{}\n")  # an earlier generation's
    device_run.unpack(out, runs)
    kept_aside = [p for p in (runs / "gpu").iterdir() if p.name.startswith("vgg11_bn.")]
    assert len(kept_aside) == 1 and (kept_aside[0] / "extra.jsonl").exists()
    assert not (runs / "gpu" / "vgg11_bn" / "extra.jsonl").exists()
    jax.tree.map(
        np.testing.assert_array_equal,
        fullwidth.load_weights(runs / "gpu" / "vgg11_bn" / "trained.npz"),
        variables,
    )


def test_a_run_of_another_recipe_is_refused(fullwidth, cifar_zip, tmp_path):
    recipe = fullwidth.RECIPES["tiny"]
    workdir = tmp_path / "vgg11_bn"
    fullwidth.save_weights(workdir / fullwidth.WEIGHTS, {"params": {"a": np.zeros(2)}})
    other = dict(fullwidth.dataclasses.asdict(recipe), epochs=7)
    (workdir / "train.json").write_text(json.dumps({"recipe": other, "test_top1": 1.0}))
    with pytest.raises(ValueError, match="another recipe"):
        fullwidth.train_stage("vgg11_bn", recipe, None, workdir, epochs=1)


def test_report_names_each_sweeps_machines_and_incomplete_sweeps(fullwidth, device_run, tmp_path):
    import fullwidth_report

    gpu = dict(platform="gpu", device="NVIDIA H200", cpu="x86_64", cores=16, jax="0.11.2")
    cpu = dict(platform="cpu", device="cpu", cpu="x86_64", cores=2, jax="0.10.2")
    line = fullwidth_report._machines_line(
        ["l1", "lamp", "taylor"], {"l1": [gpu], "lamp": [cpu, gpu]}
    )
    assert line == (
        "Evaluated: l1 on NVIDIA H200 (jax 0.11.2); lamp on this CPU (x86_64, 2 cores, jax "
        "0.10.2) and NVIDIA H200 (jax 0.11.2); taylor on a machine not recorded."
    )
    rows = [{"importance": "l1"}] * 4 + [{"importance": "lamp"}] * 3
    assert fullwidth_report._coverage_lines(rows, ["l1", "lamp"])[0].startswith(
        "lamp: 3 of 4 evaluations so far"
    )
    assert fullwidth_report._coverage_lines(rows[:4], ["l1"]) == []
    # the sweep records this machine once per importance, however often it resumes there
    path = tmp_path / fullwidth.DATAFREE_MACHINES
    for _ in range(2):
        fullwidth._record_machine(path, "lamp")
    assert json.loads(path.read_text()) == {"lamp": [fullwidth.machine()]}
    # the same generation coming back from a device joins the machines
    fullwidth._write_json(path, {"l1": [cpu]})
    returned = json.dumps({"l1": [gpu, cpu], "lamp": [gpu]}).encode()
    assert json.loads(device_run._merged(path, returned)) == {"l1": [cpu, gpu], "lamp": [gpu]}


def test_stages_run_in_the_order_given(fullwidth, tmp_path, monkeypatch):
    """A device command puts what is most needed first, whatever the stage."""
    calls = []
    for stage in ("bench", "train", "datafree", "table1", "replicas"):
        monkeypatch.setattr(
            fullwidth, f"{stage}_stage", lambda *a, stage=stage, **k: calls.append(stage)
        )
    monkeypatch.setattr(fullwidth, "load_data", lambda *a: None)
    monkeypatch.setattr(fullwidth, "write_reports", lambda *a: calls.append("report"))
    (tmp_path / "tiny" / "vgg11_bn").mkdir(parents=True)
    (tmp_path / "tiny" / "vgg11_bn" / fullwidth.WEIGHTS).write_bytes(b"")
    order = ["replicas", "train", "table1", "datafree", "bench", "report"]
    fullwidth.run_stages(fullwidth.RECIPES["tiny"], ["vgg11_bn"], order, runs=tmp_path)
    assert calls == order
    for wrong in (["train", "train"], ["evaluate"]):
        with pytest.raises(ValueError, match="stages must be distinct"):
            fullwidth.run_stages(fullwidth.RECIPES["tiny"], ["vgg11_bn"], wrong, runs=tmp_path)


def test_the_report_shows_this_cpus_run_under_way(fullwidth, tmp_path):
    import fullwidth_report

    train = tmp_path / "cpu" / "vgg11_bn" / "train"
    (train / "checkpoints" / "step_000000100").mkdir(parents=True)
    (train / "checkpoints" / ".step_000000200.tmp").mkdir()  # unfinished: not counted
    epoch = dict(epoch=1, step=390, test_top1=0.5, images_per_second=150.0)
    (train / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    runs = fullwidth._cpu_runs(tmp_path)
    assert list(runs) == ["vgg11_bn"]
    assert runs["vgg11_bn"]["step"] == 100 and runs["vgg11_bn"]["steps"] == 30 * 390
    shown = {"vgg11_bn": {"recipe": "gpu", "datafree": [], "table1": []}}
    lines = fullwidth_report._cpu_mode_section(runs, shown)
    assert "| VGG11-BN x1 | 100 of 11700 | 1 | 50.00% | 150 | 0 | 0 | the GPU run |" in lines


def test_label_smoothing_is_recorded_only_when_set_and_reported(fullwidth, tmp_path):
    import fullwidth_report
    import label_smoothing

    tiny = fullwidth.RECIPES["tiny"]
    # a recipe without smoothing records what models trained before the field existed did
    assert "label_smoothing" not in fullwidth._recorded_recipe(tiny, 1)
    smoothed = fullwidth.dataclasses.replace(tiny, label_smoothing=0.1)
    assert fullwidth._recorded_recipe(smoothed, 1)["label_smoothing"] == 0.1
    assert "label smoothing 0.1" in fullwidth_report._recipe_line(
        {"recipe": fullwidth._recorded_recipe(smoothed, 1)}
    )
    assert "not measured yet" in fullwidth_report._label_smoothing_lines(tmp_path)[0]
    rows = [
        dict(label_smoothing=s, seed=seed, test_top1=top1, epochs=10.0, test_loss=0.6,
             train_loss=0.9, train_acc=80.0, best_epoch_top1=top1)
        for s, seed, top1 in ((0.0, 0, 81.0), (0.1, 0, 80.5), (0.0, 1, 80.0), (0.1, 1, 80.25))
    ]  # fmt: skip
    csv_path = tmp_path / "data" / label_smoothing.CSV.name
    sys.modules["reproduce"]._write_rows(rows, csv_path)
    read = label_smoothing.read_rows(csv_path)
    assert label_smoothing.differences(read) == pytest.approx([-0.5, 0.25])
    line = fullwidth_report._label_smoothing_lines(tmp_path)[0]
    assert "by -0.50, +0.25 points over 2 seeds (mean -0.12;" in line
    assert "`gpu` 0, `cpu` 0." in line
    text = label_smoothing.markdown(read)
    assert "| 0.1 | 1 | 80.25% |" in text and "mean -0.12." in text
    assert "No gain measured: the differences are within the 1.00 points" in text


def test_the_cpus_own_model_is_shown_beside_the_reports_model(fullwidth):
    """The CPU-trained model's sweep and Table 1 are set beside the GPU-trained model's,
    over the cells and rows both have, with the numbers computed from the rows."""
    import fullwidth_report

    def datafree(group, default, exact, sinkhorn, base):
        top1 = dict(default=default, intra_fusion=exact, intra_fusion_sinkhorn=sinkhorn)
        return [
            dict(
                group=group,
                sparsity=0.3,
                importance="l1",
                scoring="l1",
                converged=True,
                method=m,
                top1=t,
                base_top1=base,
            )
            for m, t in top1.items()
        ]

    def table1(sparsity, default, fused):
        return [
            dict(sparsity=sparsity, method=m, pruned_top1=p, finetuned_top1=f, finetune_epochs=1)
            for m, p, f in (("default", 50.0, default), ("intra_fusion", 60.0, fused))
        ]

    machine = dict(platform="gpu", device="NVIDIA H200", jax="0.11.2")
    gpu = dict(
        recipe="gpu",
        train=dict(machine=machine, steps_per_epoch=97, recipe=dict(batch_size=512)),
        datafree=[*datafree(0, 80.0, 81.0, 81.5, 88.0), *datafree(1, 70.0, 75.0, 75.0, 88.0)],
        table1=table1(0.4, 80.0, 82.0),
    )
    cpu = dict(
        train=dict(test_top1=87.5, epochs_run=30, steps_per_epoch=390, recipe=dict(batch_size=128)),
        # group 1's cell is not finished here (no Sinkhorn yet): left out of the comparison
        datafree=[*datafree(0, 79.0, 78.0, 78.5, 87.0), *datafree(1, 60.0, 70.0, 70.0, 87.0)[:2]],
        table1=[*table1(0.4, 79.0, 78.5), *table1(0.6, 70.0, 71.0)[:1]],
    )
    lines = fullwidth_report._beside_lines("vgg11_bn", cpu, gpu)
    text = "\n".join(lines)
    assert "the 1 cells both have (l1; groups 0-0)" in text
    assert "| base top-1, folded | 87.00 | 88.00 |" in lines
    assert "| Default top-1, mean | 79.00 | 80.00 |" in lines
    assert "| Intra-Fusion (exact): mean gain | -1.00 | +1.00 |" in lines
    assert (
        "| Intra-Fusion (Sinkhorn): better / equal / worse than Default | 0 / 0 / 1 | 1 / 0 / 0 |"
        in lines
    )
    assert "same sign in 0/1 cells" in text and "differs by 2.00 points on average" in text
    # the first convolution (here group 0, the farthest group both have), both models
    assert any(line.startswith("| l1 | 30% | 79.00 | -1.00 | 80.00 | +1.00 |") for line in lines)
    # Table 1: each model's fine-tuning steps named; 60% has only Default's row here, so
    # only 40% is compared
    assert "390 steps of batch 128 here, 97 steps of batch 512 on NVIDIA H200" in text
    assert "| 40% | 50.00 | 60.00 | 79.00 | 78.50 | -0.50 | +2.00 | +0.24 |" in lines
    assert not any(line.startswith("| 60%") for line in lines)
    # the summary's line says the same in one sentence
    line = fullwidth_report._other_model_line("vgg11_bn", cpu, gpu)
    assert "87.50% after 30 epochs" in line
    assert "same sign as the model trained on NVIDIA H200 (jax 0.11.2) in 0/1" in line
    assert "Table 1 at 40%: gains after fine-tuning -0.50 vs +2.00" in line
    assert "worse than Default in 1/1 of its cells (the other model: 0/1)" in line
    # nothing in common and no Table 1 yet: no section
    assert fullwidth_report._beside_lines("vgg11_bn", dict(cpu, datafree=[], table1=[]), gpu) == []


# --------------------------------------------------------------------------- durable runs


def test_runs_results_are_tracked_and_their_weights_are_not(fullwidth):
    """The results outlive a machine wiped between sessions (git tracks them); weights,
    checkpoints, temporaries and CI-scale runs stay out of git."""
    runs = fullwidth.RUNS.relative_to(ROOT).as_posix()
    ignored = [
        f"{runs}/gpu/vgg11_bn/trained.npz",
        f"{runs}/gpu/vgg11_bn/train/checkpoints/step_000000100/ifjax_checkpoint.json",
        f"{runs}/cpu/vgg11_bn/.trained.npz.tmp.npz",
        f"{runs}/gpu/.results.zip.tmp",
        f"{runs}/tiny/vgg11_bn/train.json",
        "runs/demo/datafree.csv",
    ]
    tracked = [
        f"{runs}/gpu/vgg11_bn/train.json",
        f"{runs}/gpu/vgg11_bn/datafree_l1.jsonl",
        f"{runs}/cpu/vgg11_bn/train/metrics.jsonl",
        f"{runs}/gpu/bench.json",
    ]
    found = subprocess.run(
        ["git", "check-ignore", "--no-index", *ignored, *tracked],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert found.stdout.split() == ignored, found.stderr


def test_results_whose_weights_are_gone_are_set_aside_and_a_checkpoint_resumes(
    fullwidth, cifar_zip, tmp_path
):
    recipe = fullwidth.RECIPES["tiny"]
    workdir = tmp_path / "tiny" / "vgg11_bn"
    workdir.mkdir(parents=True)
    # a finished run whose weights and checkpoints are gone: its journals must not be
    # resumed with the weights trained next
    (workdir / "train.json").write_text(json.dumps({"recipe": "earlier", "test_top1": 1.0}))
    (workdir / "table1.jsonl").write_text('{"key": "default@0.4"}\n')
    data = fullwidth.load_data(recipe, cifar_zip)
    summary = fullwidth.train_stage("vgg11_bn", recipe, data, workdir, epochs=1)
    aside = [p for p in workdir.parent.iterdir() if p.name.startswith("vgg11_bn.")]
    assert len(aside) == 1 and (aside[0] / "table1.jsonl").exists()
    assert json.loads((aside[0] / "train.json").read_text())["recipe"] == "earlier"
    assert not (workdir / "table1.jsonl").exists()
    assert summary["recipe"] == fullwidth._recorded_recipe(recipe, 1)
    trained = fullwidth.load_weights(workdir / fullwidth.WEIGHTS)
    # the weights lost but a checkpoint kept: training resumes from it, nothing is set aside
    (workdir / fullwidth.WEIGHTS).unlink()
    (workdir / "table1.jsonl").write_text('{"key": "default@0.4"}\n')
    again = fullwidth.train_stage("vgg11_bn", recipe, data, workdir, epochs=1)
    assert (workdir / "table1.jsonl").exists() and again["test_top1"] == summary["test_top1"]
    assert len([p for p in workdir.parent.iterdir() if p.name.startswith("vgg11_bn.")]) == 1
    jax.tree.map(
        np.testing.assert_array_equal, fullwidth.load_weights(workdir / fullwidth.WEIGHTS), trained
    )


def test_device_work_keeps_whole_results_without_weights(fullwidth, device_run, tmp_path):
    """Results restored or kept without their weights: whole ones need no GPU (only a
    newer recipe would), an incomplete sweep without weights to continue it does."""
    recipe = fullwidth.RECIPES["tiny"]
    for name in fullwidth.MODELS:
        workdir = tmp_path / "tiny" / name
        workdir.mkdir(parents=True)
        trained = dict(recipe=fullwidth._recorded_recipe(recipe, recipe.epochs[name]))
        (workdir / "train.json").write_text(json.dumps(trained))
        table1 = [{"key": f"{m}@0.4"} for m in fullwidth.TABLE1_METHODS]
        (workdir / "table1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table1))
        for importance in fullwidth.IMPORTANCES if name == "vgg11_bn" else ("l1",):
            rows = [{"row": {"importance": importance, "method": m}} for m in fullwidth.METHODS]
            journal = workdir / f"datafree_{importance}.jsonl"
            journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    work = device_run.device_work(tmp_path, recipe)
    assert work["models"] == ["resnet18"] and work["stale"] == [] == work["datafree_here"]
    fullwidth.save_weights(tmp_path / "tiny" / "resnet18" / fullwidth.WEIGHTS, {"a": np.zeros(1)})
    work = device_run.device_work(tmp_path, recipe)
    assert work["models"] == [] and work["datafree_here"] == ["resnet18"]


def test_the_committed_report_is_written_from_the_committed_runs(fullwidth, tmp_path):
    """reports/fullwidth.md, gpu.md and their CSVs are what the tracked runs give, so that
    a session on another machine writes them again, whole, with what it adds."""
    import shutil

    reports = tmp_path / "reports"
    (reports / "data").mkdir(parents=True)
    for name in ("label_smoothing.csv", "table1_scale.csv"):  # what the report cites
        shutil.copy(ROOT / "reports" / "data" / name, reports / "data")
    fullwidth.write_reports(fullwidth.RUNS, reports)
    for name in (
        "fullwidth.md",
        "gpu.md",
        *(f"data/fullwidth_{t}_{m}.csv" for t in ("datafree", "table1") for m in fullwidth.MODELS),
    ):
        assert (reports / name).read_text() == (ROOT / "reports" / name).read_text(), name
    text = (reports / "fullwidth.md").read_text()
    # the CPU-trained model's rows were lost: its summary as generated then, named so
    assert "| VGG11-BN x1 | 11700 of 11700 | 30 | 87.81% | 132 | 96 (rows lost) | 8 |" in text
    assert "The data-free comparison below was generated on 2026-11-28" in text
