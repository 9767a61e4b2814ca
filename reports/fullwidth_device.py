"""The GPU run of ``reports/fullwidth.py``: what travels to the machine, what a session
runs there, and what comes back.

    python reports/reproduce.py fullwidth --device-run prepare [DIR]   # the folder to send
    python reports/reproduce.py fullwidth --device-run unpack DIR      # what came back

The GPU image has none of tensorflow-datasets, ott-jax and POT, and what travels there must
stay under 64 MiB: :func:`prepare_device` packs the zip's JPEG bytes into an 18 MB ``.npz``
(:func:`train.data.pack_cifar10`, read without tfds), downloads the wheels and writes
``plan.json`` with the commands for what is still to do on a GPU (:func:`device_work`,
:func:`device_commands`): one model per session, the one whose Table 1 is incomplete first
(else one trained with an earlier recipe), trained by the first command and continued by
the second on the same machine, then the benches that lack rows; each command stops
between units of work at its deadline and returns results and weights as at most 8 files
of at most 16 MiB (``fullwidth._export``). :func:`unpack` puts them under
``reports/runs/fullwidth/gpu`` (results tracked in git, weights not), :func:`check_here`
evaluates the returned weights on this machine, and the reports are written. A data-free
sweep left incomplete continues on this CPU with the returned weights.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fullwidth
import jax.numpy as jnp
import reproduce
from fullwidth import (
    DATAFREE_MACHINES,
    IMPORTANCES,
    METHODS,
    MODELS,
    RECIPES,
    RESULTS,
    ROOT,
    RUNS,
    TABLE1_METHODS,
    WEIGHTS,
    Recipe,
    load_weights,
    machine,
)

import ifjax
from models.registry import create_model, init_variables
from train import data as data_lib
from train import sweep, training

DEVICE_DIR = ROOT / ".device"
# What the GPU image lacks (ott-jax needs jaxopt), pinned to the versions tested here.
WHEELS = ("ott-jax==0.6.0", "jaxopt==0.8.5", "POT==0.9.7.post1")
TREE_LIMIT = 64 * 2**20  # what may travel to the GPU machine: tree + carried folder
DEVICE_DEADLINE_S = 290  # a device command starts no work after this long
DEVICE_TIMEOUT_S = 330  # the device tool's limit for one command (two fit in 12 minutes)
# Where a device command's runs live: outside the tree, which the device tool copies onto
# the machine at every call (this tree's tracked results would land on those command 1
# wrote there); a machine kept warm keeps /tmp, so command 2 goes on with command 1's model.
DEVICE_RUNS = "/tmp/ifjax-fullwidth-runs"


def join_parts(folder: Path, name: str, out: Path) -> Path | None:
    """Joins ``<name>.part0, .part1, ...`` of ``folder`` into ``out`` (None: no parts)."""
    parts = sorted(folder.glob(f"{name}.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_bytes(b"".join(p.read_bytes() for p in parts))
    os.replace(staging, out)
    return out


def unpack(returned: Path, runs: Path = RUNS, recipe: str = "gpu") -> list[Path]:
    """Puts the files a device run returned under ``runs/<recipe>``; returns what it wrote.

    A device run trains its models afresh (a fresh machine keeps nothing, and the weights
    cannot travel back there with the data and the wheels), so the results of a model
    trained anew replace the earlier ones, which are kept aside as ``<model>.<time>``. The
    same generation coming back again (a second command on a machine kept warm, its
    ``train.json`` unchanged) is merged instead: journals keep the rows evaluated here
    meanwhile, the machines of each sweep are joined.
    """
    root = runs / recipe
    results = returned / RESULTS
    if not results.exists():
        raise FileNotFoundError(f"{returned} holds no {RESULTS}: not a device run's output")
    written = []
    with zipfile.ZipFile(results) as archive:
        members = archive.namelist()
        merged = set()
        for name in {m.split("/")[0] for m in members} & set(MODELS):
            summary = f"{name}/train.json"
            present = fullwidth._read_json(root / summary)
            if present is not None and summary in members:
                if present == json.loads(archive.read(summary)):
                    merged.add(name)
                    continue
            fullwidth.set_aside(root / name)
        for member in members:
            target = root / member
            target.parent.mkdir(parents=True, exist_ok=True)
            data = archive.read(member)
            if member.split("/")[0] in merged and target.exists():
                data = _merged(target, data)
            fullwidth._write_atomically(target, data)
            written.append(target)
    for name in MODELS:
        joined = join_parts(returned, f"{name}.{WEIGHTS}", root / name / WEIGHTS)
        if joined is not None:
            load_weights(joined)  # a corrupt or truncated transfer fails here
            written.append(joined)
    return written


def _merged(present: Path, returned: bytes) -> bytes:
    """A returned file of the generation already here, joined with the present one."""
    if present.suffix == ".jsonl":
        lines = lambda data: [line + b"\n" for line in data.splitlines() if line.strip()]
        here = lines(present.read_bytes())
        return b"".join(here + [line for line in lines(returned) if line not in set(here)])
    if present.name == DATAFREE_MACHINES:
        machines = fullwidth._read_json(present) or {}
        for importance, found in json.loads(returned).items():
            for one in found:
                machines = fullwidth._with_machine(machines, importance, one)
        return json.dumps(machines, indent=1).encode()
    return returned


def check_here(runs: Path, recipe: str, data_path: str | os.PathLike | None = None) -> list:
    """Evaluates returned weights on this machine (``local_check.json`` beside them), so
    that the report can say whether the device's accuracy is reproduced here."""
    checks = []
    test = None
    for name in MODELS:
        workdir = runs / recipe / name
        trained = fullwidth._read_json(workdir / "train.json")
        if trained is None or not (workdir / WEIGHTS).exists():
            continue
        if test is None:
            per_class = RECIPES[recipe].per_class
            test = data_lib.read_cifar10_zip("test", data_path, per_class=per_class)
            evals = sweep.eval_batch_list(test, min(500, len(test)))
        model = create_model(name, 10, trained["width"])
        top1 = 100 * training.evaluate(model, load_weights(workdir / WEIGHTS), evals)["top1"]
        check = dict(model=name, top1=top1, device_top1=trained["test_top1"], machine=machine())
        fullwidth._write_json(workdir / "local_check.json", check)
        fullwidth._say(f"{name}: {top1:.2f}% here, {trained['test_top1']:.2f}% on the device")
        checks.append(check)
    return checks


# --------------------------------------------------------------------------- device run


def _tree_bytes() -> int:
    """Bytes of what the device tool sends: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum(
        (ROOT / os.fsdecode(p)).stat().st_size
        for p in listed
        if p and (ROOT / os.fsdecode(p)).is_file()
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def device_command(
    model: str, stages: Sequence[str], deadline_s: int, folder: str = ".device", extra: str = ""
) -> str:
    """The shell command that runs ``stages`` of ``model`` on the GPU machine."""
    install = (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        f"--target /tmp/site {folder}/wheels/*.whl && export PYTHONPATH=/tmp/site || exit 1; "
    )
    return (
        install
        + "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "
        # JAX takes half the GPU's memory, leaving PyTorch (the bench) the rest; compiled
        # programs persist on the machine (train.jobs' cache, off in a command with the
        # bench), so a second command there reuses the first's
        + "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 PYTHONUNBUFFERED=1 "
        + "IFJAX_COMPILATION_CACHE=/tmp/ifjax-jax-cache "
        + "python3 reports/reproduce.py fullwidth --recipe gpu "
        + f"--models {model} --stages {' '.join(stages)} --data {folder}/cifar10.npz "
        + f"--deadline-s {deadline_s} --runs {DEVICE_RUNS} "
        + f"--out $OUT{extra} 2>&1 | tee $OUT/log.txt"
    )


def _expected_cells(name: str, recipe: Recipe) -> int:
    """Cells of one importance's data-free sweep of ``name`` under ``recipe``."""
    if recipe.groups == "all":
        model = fullwidth._model(name, recipe)
        example = jnp.zeros((1, 32, 32, 3))
        groups = len(ifjax.discover_groups(model, init_variables(model, 0), example))
    else:
        groups = len(recipe.groups)
    return groups * len(recipe.sparsities) * len(METHODS)


def device_work(runs: Path = RUNS, recipe: Recipe | None = None) -> dict[str, Any]:
    """What a GPU session still has to do, from the results under ``runs/gpu``.

    Returns a dict with

    * ``models``: models whose GPU results lack some of Table 1, ResNet18 first, or lack
      some of the data-free sweep with no weights here to continue it: they are trained
      again with ``recipe`` (the ``gpu`` one) on the device, because a device run starts
      bare (the weights cannot travel there beside the data and the wheels) and
      fine-tuning at full width is out of this CPU's reach;
    * ``stale``: models whose results are whole but come from an earlier recipe (trained
      again once nothing else needs the GPU);
    * ``datafree_here``: models with Table 1 whole and a data-free sweep left incomplete,
      which continues on this CPU with the returned weights
      (``--recipe gpu --stages datafree``);
    * ``bench``, ``replicas``: whether the benches lack rows.
    """
    recipe = recipe or RECIPES["gpu"]
    root = runs / recipe.name
    work: dict[str, Any] = dict(models=[], stale=[], datafree_here=[], bench=False, replicas=False)
    for name in ("resnet18", "vgg11_bn"):
        trained = fullwidth._read_json(root / name / "train.json")
        table1 = reproduce.read_journal(root / name / "table1.jsonl") if trained else {}
        if trained is None or len(table1) < len(recipe.table1_sparsities) * len(TABLE1_METHODS):
            work["models"].append(name)
            continue
        rows = collections.Counter(r["importance"] for r in fullwidth._datafree_rows(root / name))
        cells = _expected_cells(name, recipe)
        datafree_whole = all(rows[i] >= cells for i in IMPORTANCES)
        if not (datafree_whole or (root / name / WEIGHTS).exists()):
            work["models"].append(name)  # nothing here to continue its sweep with
            continue
        if trained["recipe"] != fullwidth._recorded_recipe(recipe, recipe.epochs[name]):
            work["stale"].append(name)
        if not datafree_whole:
            work["datafree_here"].append(name)
    bench = fullwidth._read_json(root / "bench.json") or []
    have = {(r["model"], r["batch_size"], r["framework"]) for r in bench if "error" not in r}
    wanted = {(m, b, f) for m in MODELS for b in recipe.bench_batches for f in ("ifjax", "torch")}
    work["bench"] = not wanted <= have
    replicas = fullwidth._read_json(root / "replicas.json") or []
    work["replicas"] = not set(recipe.replicas) <= {r["k"] for r in replicas}
    return work


def device_commands(work: Mapping[str, Any]) -> dict[str, str]:
    """The (at most two) device commands for ``work`` (see :func:`device_work`).

    One model per session, the most needed (``work["models"]`` first, then a stale one):
    the first command trains it, then runs Table 1 and its data-free sweep until its
    deadline; the second goes on with Table 1 on the weights the first left on the machine
    (a machine kept warm between commands keeps :data:`DEVICE_RUNS`; on a fresh one there
    are none and the model's stages are skipped), runs the replicas bench if it lacks rows,
    goes on with the sweep, and ends with the training-step bench if it lacks rows.
    """
    target = next(iter([*work["models"], *work["stale"]]), None)
    runs = [(target, ["train", "table1", "datafree"])] if target else []
    # what only a GPU does first: Table 1, the replicas bench; the sweep can go on here
    second = [
        stage
        for stage, wanted in (
            ("table1", target),
            ("replicas", work["replicas"]),
            ("datafree", target),
            ("bench", work["bench"]),
        )
        if wanted
    ]
    if second:
        runs.append((target or "vgg11_bn", second))
    return {
        str(number): device_command(
            name,
            stages,
            DEVICE_DEADLINE_S,
            extra=" --bench-models " + " ".join(MODELS) if "bench" in stages else "",
        )
        for number, (name, stages) in enumerate(runs, start=1)
    }


def prepare_device(
    dest: Path = DEVICE_DIR,
    *,
    wheels: bool = True,
    per_class: int | None = None,
    data_zip: str | os.PathLike | None = None,
    runs: Path = RUNS,
) -> dict:
    """Prepares the folder that travels to the GPU: the packed data, the wheels, and the
    commands for what is still to do there (:func:`device_work` on ``runs``); checks that
    it fits in what may travel."""
    dest.mkdir(parents=True, exist_ok=True)
    packed = dest / "cifar10.npz"
    if not packed.exists() or per_class is not None or data_zip is not None:
        data_lib.pack_cifar10(packed, data_zip, per_class=per_class)
    wheel_dir = dest / "wheels"
    wheel_dir.mkdir(exist_ok=True)
    if wheels:
        for spec in WHEELS:
            name = spec.split("==")[0].replace("-", "_").lower()
            if not any(p.name.lower().startswith(name) for p in wheel_dir.glob("*.whl")):
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "-q",
                        "--no-deps",
                        "--only-binary=:all:",
                        "--python-version",
                        "3.12",
                        "--implementation",
                        "cp",
                        "--platform",
                        "manylinux_2_28_x86_64",
                        "--platform",
                        "manylinux_2_27_x86_64",
                        "--platform",
                        "manylinux_2_17_x86_64",
                        "--platform",
                        "manylinux2014_x86_64",
                        "-d",
                        str(wheel_dir),
                        spec,
                    ],
                    check=True,
                )
    carried = _folder_bytes(dest)
    inside = dest.resolve().is_relative_to(ROOT)
    tree = _tree_bytes()
    total = tree + (carried if inside else 0)
    work = device_work(runs)
    commands = device_commands(work)
    plan = dict(
        folder=str(dest),
        packed_data_bytes=packed.stat().st_size,
        wheels=sorted(p.name for p in wheel_dir.glob("*.whl")),
        carried_bytes=carried,
        tree_bytes=tree,
        total_bytes=total,
        fits=total < TREE_LIMIT,
        work=work,
        commands=commands,
        order=(
            "run the commands in order, each right after the one before: a machine kept "
            f"warm keeps {DEVICE_RUNS}, and command 2 goes on with the model command 1 trained"
        ),
        carry=[dest.name] if inside else [],
        # each command stops starting work after DEVICE_DEADLINE_S and writes its results
        # as it goes; the device tool's limit leaves room for the work under way
        timeout_s=DEVICE_TIMEOUT_S,
    )
    fullwidth._write_json(dest / "plan.json", plan)
    if not plan["fits"]:
        raise RuntimeError(
            f"{total / 2**20:.1f} MiB would travel, over {TREE_LIMIT / 2**20:.0f} MiB"
        )
    return plan


# --------------------------------------------------------------------------- command


def main(args: argparse.Namespace) -> int:
    """``--device-run prepare [DIR]`` or ``--device-run unpack DIR`` (the arguments of
    :func:`fullwidth.add_arguments`)."""
    action, *rest = args.device_run
    if action == "prepare":
        dest = Path(rest[0]) if rest else DEVICE_DIR
        per_class = RECIPES["tiny"].per_class if args.tiny else None
        plan = prepare_device(
            dest,
            wheels=not args.no_wheels,
            per_class=per_class,
            data_zip=args.data,
            runs=args.runs,
        )
        print(json.dumps(plan, indent=1))
        if not plan["commands"]:
            fullwidth._say("nothing is left for a GPU: every GPU stage has its results")
        for name in plan["work"]["datafree_here"]:
            fullwidth._say(
                f"{name}'s data-free sweep goes on here: python reports/reproduce.py "
                f"fullwidth --recipe gpu --models {name} --stages datafree report"
            )
        return 0
    if action == "unpack" and rest:
        recipe = "tiny" if args.tiny else "gpu"
        for path in unpack(Path(rest[0]), args.runs, recipe):
            fullwidth._say(f"unpacked {path}")
        check_here(args.runs, recipe, args.data)
        fullwidth.write_reports(args.runs, args.reports)
        return 0
    raise SystemExit("--device-run takes 'prepare [DIR]' or 'unpack DIR'")
