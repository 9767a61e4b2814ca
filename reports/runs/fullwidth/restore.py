"""Restores the full-width runs' result files from the reports they were written into.

On 2026-12-08 the machine holding ``runs/fullwidth`` (then ignored by git) had been wiped:
the runs' own files (train.json, journals, weights, checkpoints) were gone, while the
reports written from them were committed. This script wrote the result files of this
folder (now tracked) back from those reports, at commit ``SOURCE``, so that the reports
can be written again from files and future runs add to them:

* the models trained on the H200 (``gpu/``): the data-free and Table 1 rows from the CSVs
  (every value as measured: top-1 over 10,000 images is a multiple of 0.01), the rest
  (accuracies, images/s, timings, machines) from ``reports/fullwidth.md`` and
  ``reports/gpu.md`` as shown there;
* the model trained on this CPU (``cpu/``): its training summary and Table 1 from the
  report; its per-cell data-free rows were never written into a committed file, so only
  their summary as generated then is kept (``restored.json``, ``lost``).

Lost for good: the per-epoch training histories (the training figure stays the one drawn
from them), timings beyond the digits shown, and the weights (a GPU session trains the
models again; ``fullwidth_device.device_work`` plans it).

    python reports/runs/fullwidth/restore.py [--again]   # the files beside this script
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SOURCE = "c7462c681ef92458f8f1490ba94559e4a5b6d4a7"  # the last commit written from the runs
DATE = "2026-12-08"
H200 = dict(platform="gpu", device="NVIDIA H200", jax="0.11.2")
CPU = dict(platform="cpu", device="cpu", cpu="x86_64", cores=2, jax="0.10.2")
SETTINGS = dict(solver="exact", epsilon=0.001, paper_lamp=True, seed=0)  # the sweep's
NOTE = (
    f"restored on {DATE} from `reports/fullwidth.md`, `reports/gpu.md` and "
    f"`reports/data/fullwidth_*.csv` of commit {SOURCE[:7]} (the machine holding the run's "
    "files was wiped); every number is as reported then; lost are the per-epoch history "
    "(the training figure is the one drawn from it), timings beyond the digits shown"
)


def _recipe(name: str, epochs: int, batch: int, peak: float, dtype, finetune_lr: float) -> dict:
    """A recipe as train.json recorded it then (the fields the report shows or implies)."""
    return dict(
        name=name,
        epochs=epochs,
        batch_size=batch,
        peak_lr=peak,
        compute_dtype=dtype,
        finetune_epochs=1,
        finetune_lr=finetune_lr,
        width=1.0,
        per_class=None,
        max_steps=None,
        groups="all",
        sparsities=[0.1, 0.3, 0.5, 0.7],
        table1_sparsities=[0.4, 0.6, 0.7, 0.8],
    )


def _show(path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{SOURCE}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _json(path: Path, data) -> None:
    _write(path, json.dumps(data, indent=1) + "\n")


def _lines(path: Path, rows) -> None:
    _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _rows(path: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(_show(path))))


def _number(text: str) -> float:
    return float(text.replace("%", "").replace("**", ""))


def _gpu_model(name: str, report: str, epochs: int, machines: dict) -> None:
    label = {"vgg11_bn": "VGG11-BN", "resnet18": "ResNet18"}[name]
    out = HERE / "gpu" / name
    base = re.search(
        rf"^\| {label} x1 \| NVIDIA H200 \(jax 0\.11\.2\) \| .*? \| (\d+) \| \*\*([\d.]+)%\*\* \| "
        r"[\d.-]+% \| ([\d.]+) min \| (\d+) \|$",
        report,
        re.M,
    )
    check = re.search(rf"\*\*{label} base model\*\*: .*?evaluated on this CPU: ([\d.]+)%", report)
    epochs_run, top1, minutes, rate = base.groups()
    assert int(epochs_run) == epochs
    recipe = _recipe("gpu", epochs, 512, 0.2, "bfloat16", 0.04)
    _json(
        out / "train.json",
        dict(
            model=name,
            width=1.0,
            recipe=recipe,
            epochs_run=epochs,
            test_top1=float(top1),
            test_images=10000,
            train_seconds=60 * float(minutes),
            images_per_second=float(rate),
            steps_per_epoch=50_000 // 512,
            history=[],
            machine=H200,
        ),
    )
    _json(
        out / "local_check.json",
        dict(model=name, top1=float(check.group(1)), device_top1=float(top1), machine=CPU),
    )
    by_importance: dict[str, list] = {}
    for r in _rows(f"reports/data/fullwidth_datafree_{name}.csv"):
        row = dict(
            group=int(r["group"]),
            sparsity=float(r["sparsity"]),
            importance=r["importance"],
            method=r["method"],
            top1=float(r["top1"]),
            base_top1=float(r["base_top1"]),
            scoring=r["scoring"],
            converged=r["converged"] == "True",
        )
        if r["recalibrate"]:  # journals written before the option lack it
            row["recalibrate"] = int(r["recalibrate"])
        settings = SETTINGS | dict(base_top1=row["base_top1"], images=10000)
        by_importance.setdefault(r["importance"], []).append(dict(settings=settings, row=row))
    for importance, records in by_importance.items():
        _lines(out / f"datafree_{importance}.jsonl", records)
    _json(out / "datafree_machines.json", {i: [machines[i]] for i in by_importance})
    table1 = [
        dict(
            key=r["key"],
            model=r["model"],
            method=r["method"],
            sparsity=float(r["sparsity"]),
            base_top1=float(r["base_top1"]),
            pruned_top1=float(r["pruned_top1"]),
            finetuned_top1=float(r["finetuned_top1"]),
            finetune_epochs=int(r["finetune_epochs"]),
            params=int(r["params"]),
            dense_params=int(r["dense_params"]),
            prune_seconds=float(r["prune_seconds"]),
            finetune_seconds=float(r["finetune_seconds"]),
        )
        for r in _rows(f"reports/data/fullwidth_table1_{name}.csv")
    ]
    _lines(out / "table1.jsonl", table1)
    _json(out / "restored.json", dict(date=DATE, source=SOURCE, note=NOTE + "."))


def _bench(gpu_report: str) -> None:
    rows = []
    pattern = (
        r"^\| (ResNet18|VGG11-BN) \| (\d+) \| (\w+) \| (\d+) \| (\d+) \| [\d.]+x \| ([\d.]+) \|$"
    )
    for label, batch, dtype, ours, theirs, first in re.findall(pattern, gpu_report, re.M):
        name = {"ResNet18": "resnet18", "VGG11-BN": "vgg11_bn"}[label]
        common = dict(model=name, batch_size=int(batch), compute_dtype=dtype, machine=H200)
        rows.append(
            common
            | dict(
                framework="ifjax", images_per_second=float(ours), first_step_seconds=float(first)
            )
        )
        rows.append(common | dict(framework="torch", images_per_second=float(theirs)))
    assert len(rows) == 8
    _json(HERE / "gpu" / "bench.json", rows)


def _cpu_model(report: str) -> None:
    out = HERE / "cpu" / "vgg11_bn"
    lines = report.splitlines()
    summary = next(line for line in lines if line.startswith("- **VGG11-BN trained on this CPU**"))
    top1, epochs = re.search(r"\): ([\d.]+)% after (\d+) epochs", summary).groups()
    fragment = re.search(r"(; over the 32 data-free cells .*?\(the other model: 3/4\))", summary)
    state = re.search(
        r"^\| VGG11-BN x1 \| (\d+) of (\d+) \| (\d+) \| ([\d.]+)% \| (\d+) \| (\d+) \| (\d+) \|",
        report,
        re.M,
    )
    steps, _, epochs_run, last, rate, datafree, _ = state.groups()
    assert (epochs_run, last) == (epochs, top1)
    recipe = _recipe("cpu", int(epochs), 128, 0.05, None, 0.01)
    _json(
        out / "train.json",
        dict(
            model="vgg11_bn",
            width=1.0,
            recipe=recipe,
            epochs_run=int(epochs),
            test_top1=float(top1),
            test_images=10000,
            train_seconds=None,
            images_per_second=float(rate),
            steps_per_epoch=int(steps) // int(epochs),
            history=[],
            machine=CPU,
        ),
    )
    start = lines.index("Data-free, the 32 cells both have (l1; groups 0-7):")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("Table 1: each model"))
    section = lines[start:end]
    while section and not section[-1]:
        section.pop()
    counts = {
        float(r["sparsity"]): (int(r["params"]), int(r["dense_params"]))
        for r in _rows("reports/data/fullwidth_table1_vgg11_bn.csv")
    }
    table1 = []
    for line in lines[end:]:
        found = re.match(
            r"^\| (\d+)% \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [-+][\d.]+ \|", line
        )
        if not found:
            continue
        sparsity = int(found.group(1)) / 100
        values = [float(v) for v in found.groups()[1:]]
        params, dense = counts[sparsity]  # the same architecture pruned alike
        for method, pruned, tuned in (
            ("default", values[0], values[2]),
            ("intra_fusion", values[1], values[3]),
        ):
            table1.append(
                dict(
                    key=f"{method}@{sparsity}",
                    model="vgg11_bn",
                    method=method,
                    sparsity=sparsity,
                    base_top1=float(top1),
                    pruned_top1=pruned,
                    finetuned_top1=tuned,
                    finetune_epochs=1,
                    params=params,
                    dense_params=dense,
                )
            )
    assert len(table1) == 8
    _lines(out / "table1.jsonl", table1)
    note = (
        NOTE + ", the training time, and the per-cell data-free rows, which no committed file "
        "held (their summary as generated on 2026-11-28 is kept)."
    )
    lost = dict(
        datafree_rows=int(datafree),
        datafree_section=section,
        datafree_section_date="generated on 2026-11-28",
        summary=fragment.group(1),
    )
    _json(out / "restored.json", dict(date=DATE, source=SOURCE, note=note, lost=lost))


def main() -> None:
    present = [p for p in (HERE / "gpu", HERE / "cpu") if p.exists()]
    if present and "--again" not in sys.argv:
        raise SystemExit(
            f"{', '.join(map(str, present))} exist: restored already, and later runs may have "
            "added to them; pass --again to write the restored files over them"
        )
    report = _show("reports/fullwidth.md")
    machines = {"l1": H200, "lamp": CPU, "taylor": CPU}  # the report's "Evaluated:" lines
    assert (
        report.count(
            "Evaluated: l1 on NVIDIA H200 (jax 0.11.2); lamp, taylor on this CPU (x86_64, 2 cores, "
            "jax 0.10.2)."
        )
        == 2
    )
    _gpu_model("vgg11_bn", report, 30, machines)
    _gpu_model("resnet18", report, 15, machines)
    _bench(_show("reports/gpu.md"))
    _cpu_model(report)


if __name__ == "__main__":
    main()
