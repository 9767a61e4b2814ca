"""Regenerates the reproduction reports in ``reports/`` from scratch, one command each.

    python reports/reproduce.py datafree --model vgg11_bn     # reports/datafree_vgg11_bn.md
    python reports/reproduce.py datafree --model resnet18     # reports/datafree_resnet18.md
    python reports/reproduce.py finetuned --model vgg11_bn    # reports/finetuned_vgg11_bn.md
    python reports/reproduce.py all                           # everything above
    python reports/reproduce.py fullwidth                     # full width: reports/fullwidth.py

Every step trains what it needs first (the base model of :data:`SETTINGS`, into
``runs/reports/<model>_x<width>``) and resumes: training from its last checkpoint, the
data-free sweep from its journal, each fine-tuning run from its checkpoint. So a command
cut short is simply run again. Models are the CIFAR variants trained on the offline
CIFAR-10 (``../shared/data/cifar10-jpeg.zip``) at the reduced widths of
:data:`SETTINGS`, which is what a 2-core CPU allows; the paper's checkpoints are full
width, trained 300 epochs on a GPU. Reports therefore compare *gains* (Intra-Fusion
minus Default) and their signs with the paper's, not absolute accuracies.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "reports"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ifjax  # noqa: E402
from train import jobs, paper, sweep  # noqa: E402
from train.commands import (  # noqa: E402
    DatafreeOptions,
    EvalOptions,
    FinetuneOptions,
    PruneOptions,
    TrainOptions,
)

REPORTS = ROOT / "reports"
RUNS = ROOT / "runs" / "reports"
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
IMPORTANCES = ("l1", "lamp", "taylor")
METHODS = ("default", "intra_fusion", "intra_fusion_sinkhorn", "intra_fusion_row_average")
FINETUNE_SPARSITIES = (0.4, 0.6, 0.7, 0.8)
# What a 2-core CPU allows (see the module docstring). test_subset None: all 10,000.
SETTINGS: dict[str, dict[str, Any]] = {
    "vgg11_bn": dict(
        width=0.25, epochs=10, schedule="fast", test_subset=5000, finetune_epochs=2, methods=METHODS
    ),
    # ResNet18 is ~4x the compute of VGG11-BN per image: narrower, shorter, fewer test
    # images, and the row-average ablation only on VGG11-BN.
    "resnet18": dict(
        width=0.125,
        epochs=5,
        schedule="fast",
        test_subset=2000,
        finetune_epochs=1,
        methods=METHODS[:3],
    ),
    # The ViT of issue 15 (models/vit.py: patch 4, depth 4, width 128, 4 heads of 32, MLP
    # 256) at full width, trained with AdamW, the usual optimizer of vision transformers.
    "vit": dict(
        width=1.0,
        epochs=15,
        schedule="fast",
        optimizer="adamw",
        peak_lr=1e-3,
        weight_decay=0.05,
        test_subset=2000,
        finetune_epochs=1,
    ),
    # The CIFAR MobileNetV2 (models/mobilenet.py: stem 16, 17 inverted residual blocks,
    # hidden widths 16-480, head 1280 at width 0.5; 0.70M parameters) with SGD. Measured
    # on this 2-core CPU (nice, batch 128): a training step 60-65 images/s when the CPU is
    # otherwise idle (thanks to the depthwise lowering of models/layers.py; 9-10 images/s
    # with XLA's own depthwise convolutions), 31-38 images/s while other jobs share it
    # (load 4-6); the whole `ifjax train` loop (data, augmentation, evaluation) 29-33
    # images/s shared. 2 epochs: ~30 min idle, ~55 min shared.
    "mobilenetv2": dict(
        width=0.5,
        epochs=2,
        schedule="fast",
        test_subset=2000,
        finetune_epochs=1,
    ),
    # The small MobileNetV2 of reports/mobilenet.py (models/mobilenet.py SMALL_CONFIG: 10
    # blocks, head 640; 0.33M parameters at width 0.5): a training step of batch 128
    # measured 300 images/s on this 2-core CPU (shared with another job).
    "mobilenetv2_small": dict(
        width=0.5,
        epochs=8,
        schedule="fast",
        test_subset=2000,
        finetune_epochs=1,
    ),
}
# The paper's CNNs; the ViT has its own report, reports/vit.py (it trains through
# base_model("vit") with the settings above). MobileNetV2 trains the same way (`base --model
# mobilenetv2`); it has no report yet.
CNN_MODELS = ("vgg11_bn", "resnet18")
LABELS = {
    "intra_fusion": "Intra-Fusion (exact)",
    "intra_fusion_sinkhorn": "Intra-Fusion (Sinkhorn)",
    "intra_fusion_row_average": "Intra-Fusion (row-average map)",
}


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of a report's journal (JSON lines, each with a "key"), by key; a line
    cut short by an interruption is left out (its cell runs again)."""
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["key"]] = row
    return rows


def append_journal(path: Path, row: Mapping[str, Any]) -> None:
    """Appends one row to a report's journal, on disk before this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _workdir(model: str) -> Path:
    return RUNS / f"{model}_x{SETTINGS[model]['width']}"


def _command(step: str, model: str | None = None) -> str:
    return f"python reports/reproduce.py {step}" + (f" --model {model}" if model else "")


def base_model(model: str) -> dict[str, Any]:
    """Trains (or resumes, or finds finished) the report's base model of ``model``."""
    config = SETTINGS[model]
    options = TrainOptions(
        model=model,
        dataset="cifar10",
        workdir=_workdir(model),
        width_multiplier=config["width"],
        epochs=config["epochs"],
        schedule=config["schedule"],
        train_subset=config.get("train_subset"),
        **{k: config[k] for k in ("optimizer", "peak_lr", "weight_decay") if k in config},
    )
    result = jobs.train(**options.arguments())
    if not result["finished"]:
        raise RuntimeError(f"training of {model} stopped before the end; run again to resume")
    return result


def _environment() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()})"
    )


def _base_lines(model: str, trained: Mapping[str, Any], extra: str = "") -> list[str]:
    config = SETTINGS[model]
    images = config["test_subset"] or 10000
    return [
        f"Model: **{model} x{config['width']}** (CIFAR variant, every width x{config['width']} "
        f"of the paper's), trained by ifjax on the offline CIFAR-10 "
        f"({_train_images(config)}) for {config['epochs']} epoch(s) with the "
        f"`{config['schedule']}` recipe (batch 128, SGD momentum 0.9, weight decay 5e-4, "
        f"crop + flip); test top-1 **{trained['test_top1']:.2f}%** on the 10,000 "
        "test images. The paper's models are full width, 300 epochs "
        f"({_PAPER_BASE.get(model, '?')}).",
        "",
        f"Evaluation: {images:,} test images{' (a fixed random subset)' if images < 10000 else ''}"
        f", sample-weighted top-1. {extra}",
        "",
        f"Machine: {_environment()}.",
        "",
    ]


def _train_images(config: Mapping[str, Any]) -> str:
    subset = config.get("train_subset")
    return "all 50,000 training images" if subset is None else f"{subset:,} training images"


_PAPER_BASE = {"vgg11_bn": "about 89.6-90.2%", "resnet18": "about 95.0-95.2%"}


# --------------------------------------------------------------------------- data-free


def datafree(model: str) -> Path:
    """The data-free report of ``model``: reports/datafree_<model>.md, CSV and plots."""
    trained = base_model(model)
    config = SETTINGS[model]
    start = time.perf_counter()
    options = DatafreeOptions(
        checkpoint=trained["checkpoint"],
        out=_workdir(model) / "datafree",
        sparsities=SPARSITIES,
        importances=IMPORTANCES,
        methods=config.get("methods", METHODS),
        test_subset=config["test_subset"],
    )
    result = jobs.datafree(**options.arguments())
    seconds = time.perf_counter() - start
    rows = result["rows"]
    data_dir = REPORTS / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sweep.write_csv(rows, data_dir / f"datafree_{model}.csv")
    cells = _cells(rows)
    figures = REPORTS / "figures"
    plots = [
        _plot_gain_maps(cells, model, figures / f"datafree_{model}_gains.png"),
        sweep.plot_datafree(
            [r for r in rows if r["method"] in ("default", "intra_fusion")],
            figures / f"datafree_{model}_top1.png",
            title=f"{model} x{config['width']}: top-1 after pruning one group",
        ),
    ]
    text = _datafree_markdown(model, trained, rows, cells, plots, seconds)
    path = REPORTS / f"datafree_{model}.md"
    _write_text(path, text)
    print(f"wrote {path}")
    return path


def _cells(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(group, sparsity, importance) -> {method: top1, "paper_gain", "converged", ...}."""
    cells: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (int(row["group"]), round(float(row["sparsity"]), 6), str(row["importance"]))
        cell = cells.setdefault(key, {"base": float(row["base_top1"])})
        cell[row["method"]] = float(row["top1"])
        if row.get("paper_gain", "") != "":
            cell["paper_gain"] = float(row["paper_gain"])
            cell["paper_default"] = float(row["paper_default"])
        if row["method"] == "intra_fusion_sinkhorn":
            cell["sinkhorn_converged"] = bool(row["converged"])
    return cells


def _gain(cell: Mapping[str, Any], method: str = "intra_fusion") -> float:
    return cell[method] - cell["default"]


def _sign(value: float) -> int:
    return int(np.sign(round(value, 6)))


def _agreement(ours: Sequence[float], theirs: Sequence[float]) -> tuple[int, float]:
    """How far two sets of paired gains agree: (pairs with the same sign, correlation;
    0 where either set is constant)."""
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    agree = sum(_sign(a) == _sign(b) for a, b in zip(ours, theirs, strict=True))
    corr = float(np.corrcoef(ours, theirs)[0, 1]) if np.std(ours) * np.std(theirs) else 0.0
    return agree, corr


def _better_equal_worse(gains: Sequence[float]) -> str:
    """ "better / equal / worse": gains above, within and below 1e-6 of zero."""
    gains = np.asarray(gains)
    better, worse = int(np.sum(gains > 1e-6)), int(np.sum(gains < -1e-6))
    return f"{better} / {len(gains) - better - worse} / {worse}"


def _summary_lines(cells: Mapping[tuple, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| importance | variant | cells | mean gain | IF better / equal / worse | "
        "sign agrees with paper | paper's mean gain | correlation with paper's gains |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for importance in IMPORTANCES:
        mine = {k: c for k, c in cells.items() if k[2] == importance}
        for method in METHODS[1:]:
            have = [c for c in mine.values() if method in c and "default" in c]
            if not have:
                continue
            gains = np.array([_gain(c, method) for c in have])
            paired = [c for c in have if "paper_gain" in c]
            if paired:
                ours = np.array([_gain(c, method) for c in paired])
                theirs = np.array([c["paper_gain"] for c in paired])
                agree, corr = _agreement(ours, theirs)
                paper_cols = f"{agree}/{len(paired)} | {theirs.mean():+.2f} | {corr:.2f}"
            else:
                paper_cols = "- | - | -"
            lines.append(
                f"| {importance} | {LABELS[method]} | {len(have)} | {gains.mean():+.2f} | "
                f"{_better_equal_worse(gains)} | {paper_cols} |"
            )
    return lines


def _gain_table(
    cells: Mapping[tuple, Mapping[str, Any]],
    importance: str,
    sparsities: Sequence[float] = SPARSITIES,
) -> list[str]:
    groups = sorted({k[0] for k in cells if k[2] == importance})
    header = ["group", "", *(f"{s:.0%}" for s in sparsities)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(sparsities)]
    for group in groups:
        row = [cells.get((group, s, importance), {}) for s in sparsities]
        lines.append(
            f"| {group} | Default top-1 | "
            + " | ".join(f"{c['default']:.2f}" if "default" in c else "" for c in row)
            + " |"
        )
        for method, label in (
            ("intra_fusion", "gain, exact"),
            ("intra_fusion_sinkhorn", "gain, Sinkhorn"),
            ("intra_fusion_row_average", "gain, row-average"),
        ):
            if not any(method in c for c in row):
                continue
            lines.append(
                f"| {group} | {label} | "
                + " | ".join(f"{_gain(c, method):+.2f}" if method in c else "" for c in row)
                + " |"
            )
        if any("paper_gain" in c for c in row):
            marks = []
            for c in row:
                if "paper_gain" not in c or "intra_fusion" not in c:
                    marks.append("")
                    continue
                same = _sign(_gain(c)) == _sign(c["paper_gain"])
                marks.append(f"{c['paper_gain']:+.2f} {'✓' if same else '✗'}")
            lines.append(f"| {group} | paper gain | " + " | ".join(marks) + " |")
    return lines


def _disagreements(cells: Mapping[tuple, Mapping[str, Any]], limit: int = 15) -> list[str]:
    differing = [
        (k, c)
        for k, c in cells.items()
        if "paper_gain" in c and "intra_fusion" in c and _sign(_gain(c)) != _sign(c["paper_gain"])
    ]
    unmatched = sorted({k[0] for k, c in cells.items() if "paper_gain" not in c})
    note = (
        [f"The paper has no numbers for group(s) {', '.join(map(str, unmatched))}.", ""]
        if unmatched
        else []
    )
    if not differing:
        return [*note, "None: every compared cell has the paper's sign."]
    differing.sort(key=lambda kc: -abs(kc[1]["paper_gain"] - _gain(kc[1])))
    lines = [
        *note,
        f"{len(differing)} cells differ in sign; the {min(limit, len(differing))} with the "
        "largest difference between the gains:",
        "",
        "| group | sparsity | importance | our Default | our gain | paper's Default | "
        "paper's gain |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for (group, sparsity, importance), c in differing[:limit]:
        lines.append(
            f"| {group} | {sparsity:.0%} | {importance} | {c['default']:.2f} | "
            f"{_gain(c):+.2f} | {c['paper_default']:.2f} | {c['paper_gain']:+.2f} |"
        )
    # top-1 is a multiple of 0.01: a gain of 0.1 (10 images) is not under 0.1, whatever the
    # floating-point subtraction leaves in the last bits
    small = sum(
        round(abs(c["paper_gain"]), 6) < 0.1 and round(abs(_gain(c)), 6) < 0.1 for _, c in differing
    )
    lines += [
        "",
        f"{small} of the {len(differing)} are cells where both gains are under 0.1 points "
        "(a few test images), i.e. both methods are still at the base accuracy.",
    ]
    return lines


def _solver_lines(cells: Mapping[tuple, Mapping[str, Any]]) -> list[str]:
    both = [c for c in cells.values() if "intra_fusion" in c and "intra_fusion_sinkhorn" in c]
    if not both:
        return []
    diff = np.array([c["intra_fusion_sinkhorn"] - c["intra_fusion"] for c in both])
    converged = sum(c.get("sinkhorn_converged", False) for c in both)
    same_sign = sum(
        _sign(_gain(c, "intra_fusion_sinkhorn")) == _sign(_gain(c)) for c in both if "default" in c
    )
    return [
        f"Sinkhorn (ott-jax, relative epsilon 1e-3, threshold 1e-4, at most 5,000 "
        f"iterations) vs the exact solver over {len(both)} cells: top-1 differs by "
        f"{np.mean(np.abs(diff)):.2f} points on average (max {np.max(np.abs(diff)):.2f}); "
        f"Sinkhorn minus exact is {np.mean(diff):+.2f} on average; the gain over Default "
        f"has the same sign in {same_sign}/{len(both)} cells; Sinkhorn converged in "
        f"{converged}/{len(both)}.",
    ]


def _row_average_lines(cells: Mapping[tuple, Mapping[str, Any]]) -> list[str]:
    both = [c for c in cells.values() if "intra_fusion" in c and "intra_fusion_row_average" in c]
    if not both:
        return ["Not run for this model (to fit the CPU budget, the ablation is VGG11-BN's)."]
    diff = np.array([c["intra_fusion_row_average"] - c["intra_fusion"] for c in both])
    better = int(np.sum(diff > 1e-6))
    return [
        "The reference sums the writing rows with the transport map's coefficients (each "
        "column of the map sums to the kept channel's mass, so a kept channel that absorbs "
        "others grows); the row-average variant divides by that mass, which keeps a "
        "duplicate channel's function exactly. Over "
        f"{len(both)} cells, row-average minus reference: {np.mean(diff):+.2f} points on "
        f"average (median {np.median(diff):+.2f}); better in {better}, worse in "
        f"{int(np.sum(diff < -1e-6))}.",
    ]


def _plot_gain_maps(
    cells: Mapping[tuple, Mapping[str, Any]],
    model: str,
    path: Path,
    sparsities: Sequence[float] = SPARSITIES,
) -> Path:
    """Heatmaps of the gain per (group, sparsity): ours, Sinkhorn's, row-average's, paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [
        ("intra_fusion", "ours (exact)"),
        ("intra_fusion_sinkhorn", "ours (Sinkhorn)"),
        ("intra_fusion_row_average", "ours (row-average)"),
        ("paper", "paper"),
    ]
    columns = [
        (method, title)
        for method, title in columns
        if method == "paper" or any(method in c for c in cells.values())
    ]
    groups = sorted({k[0] for k in cells})
    figure, axes = plt.subplots(
        len(IMPORTANCES),
        len(columns),
        figsize=(3.0 * len(columns) + 1.2, 0.32 * len(groups) * len(IMPORTANCES) + 1.8),
        squeeze=False,
        layout="constrained",
    )
    limit = 10.0
    image = None
    for r, importance in enumerate(IMPORTANCES):
        for col, (method, title) in enumerate(columns):
            grid = np.full((len(groups), len(sparsities)), np.nan)
            for i, group in enumerate(groups):
                for j, sparsity in enumerate(sparsities):
                    cell = cells.get((group, sparsity, importance), {})
                    if method == "paper":
                        grid[i, j] = cell.get("paper_gain", np.nan)
                    elif method in cell and "default" in cell:
                        grid[i, j] = _gain(cell, method)
            ax = axes[r][col]
            image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_title(f"{importance}: {title}", fontsize=8)
            ax.set_xticks(range(len(sparsities)), [f"{s:.0%}" for s in sparsities], fontsize=6)
            ax.set_yticks(range(len(groups)), [str(g) for g in groups], fontsize=6)
            if col == 0:
                ax.set_ylabel("group", fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.6, label=f"gain (points, clipped at ±{limit:g})")
    figure.suptitle(
        f"{model}: Intra-Fusion minus Default, data-free (blue: Intra-Fusion better)", fontsize=9
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _datafree_markdown(model, trained, rows, cells, plots, seconds) -> str:
    has_paper = any("paper_gain" in c for c in cells.values())
    lines = [
        f"# Data-free pruning: {model} on CIFAR-10, ifjax vs the paper",
        "",
        *_base_lines(model, trained),
        f"Regenerate: `{_command('datafree', model)}` (trains the base model first if needed).",
        "",
        "One group pruned at a time (BatchNorm folded, no fine-tuning), every group x "
        "sparsity 10-70% x importance (l1, lamp, taylor). Methods: Default pruning, "
        "Intra-Fusion with the exact solver (as the paper), Intra-Fusion with Sinkhorn, "
        "and Intra-Fusion with the row-averaged map (ablation). 'lamp' is scored with the "
        "released code's LAMP, as the paper's numbers were; taylor uses gradients summed "
        "over 5 batches of 128 augmented training images. Group 0 is nearest the output.",
        "",
        f"Base model on these evaluation images, BatchNorm folded: "
        f"{next(iter(cells.values()))['base']:.2f}%.",
        "",
        f"Sweep time: {seconds / 60:.1f} min on this machine ({len(rows)} evaluations; "
        "a resumed sweep counts only the part it ran).",
        "",
        "## Summary",
        "",
        *_summary_lines(cells),
        "",
        "'gain' = Intra-Fusion top-1 minus Default top-1 in the same cell, in points. "
        "'sign agrees' counts cells where our exact-solver gain and the paper's gain have "
        "the same sign (zero counts as its own sign)."
        if has_paper
        else "The paper has no numbers for this model.",
        "",
        f"![gains]({plots[0].relative_to(REPORTS)})",
        "",
        f"![top-1]({plots[1].relative_to(REPORTS)})",
        "",
        "## Exact solver vs Sinkhorn",
        "",
        *_solver_lines(cells),
        "",
        "## Ablation: row-averaged map",
        "",
        *_row_average_lines(cells),
        "",
        "## Where we differ from the paper",
        "",
        *(_disagreements(cells) if has_paper else ["(no paper numbers)"]),
        "",
    ]
    for importance in IMPORTANCES:
        lines += [f"## {importance}: gains per cell", "", *_gain_table(cells, importance), ""]
    lines += [
        f"Raw rows: `reports/data/datafree_{model}.csv` (one row per cell and method, with "
        "the paper's numbers where it has the cell).",
        "",
    ]
    return "\n".join(lines)


def check(model: str, cells: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """Recomputes ``cells`` random cells of the data-free journal with the current code.

    A report's sweep may have been computed by an older checkout, or resumed across
    several; this re-runs a seeded random sample of its cells from scratch (same model,
    same test images, same settings) and returns them with the recorded accuracy.

    Raises:
      AssertionError: naming the cells whose accuracy differs from the journal's.
    """
    journal = _workdir(model) / "datafree" / "datafree.jsonl"
    if not journal.exists():
        raise FileNotFoundError(f"{journal} does not exist: run the datafree step first")
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    entries = [e for e in entries if e["row"]["importance"] != "random"]
    chosen = np.random.default_rng(seed).choice(len(entries), min(cells, len(entries)), False)
    restored = jobs.restore(_workdir(model) / "model")
    name = restored.dataset(None)
    test_set = jobs.load_split(name, "test", subset=SETTINGS[model]["test_subset"])
    batches = sweep.eval_batch_list(test_set, jobs.EVAL_BATCH_SIZE)
    gradients = None
    out, wrong = [], []
    for index in sorted(chosen):
        settings, row = entries[index]["settings"], entries[index]["row"]
        if row["importance"] == "taylor" and gradients is None:
            groups = ifjax.discover_groups(
                restored.model, restored.variables, restored.example_input
            )
            folded = ifjax.fold_batchnorm(restored.variables, groups)
            gradients = sweep.taylor_gradients(
                restored.model, folded, jobs.load_split(name, "train"), seed=settings["seed"]
            )
        again = sweep.datafree_sweep(
            restored.model,
            restored.variables,
            batches,
            example_input=restored.example_input,
            groups=[row["group"]],
            sparsities=[row["sparsity"]],
            importances=[row["importance"]],
            methods=[row["method"]],
            solver=settings["solver"],
            epsilon=settings["epsilon"],
            paper_lamp=settings["paper_lamp"],
            gradients=gradients,
            seed=settings["seed"],
            progress=False,
        )[0]
        result = dict(row, recomputed=again["top1"])
        out.append(result)
        label = f"group {row['group']} {row['importance']} {row['sparsity']:.0%} {row['method']}"
        print(f"{label}: journal {row['top1']:.2f}, recomputed {again['top1']:.2f}")
        if abs(again["top1"] - row["top1"]) > 1e-9:
            wrong.append(label)
    assert not wrong, f"cells differ from the journal: {wrong}"
    return out


# --------------------------------------------------------------------------- fine-tuned


def finetuned(model: str, epochs: int | None = None) -> Path:
    """Table 1: all groups pruned at 40-80%, Default vs Intra-Fusion, then fine-tuned."""
    trained = base_model(model)
    epochs = epochs or SETTINGS[model]["finetune_epochs"]
    rows = []
    for sparsity in FINETUNE_SPARSITIES:
        for method in ("default", "intra_fusion"):
            rows.append(_prune_and_finetune(model, trained, method, sparsity, epochs))
    data_dir = REPORTS / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_rows(rows, data_dir / f"finetuned_{model}.csv")
    path = REPORTS / f"finetuned_{model}.md"
    _write_text(path, _finetuned_markdown(model, trained, rows, epochs))
    print(f"wrote {path}")
    return path


def _prune_and_finetune(model, trained, method: str, sparsity: float, epochs: int) -> dict:
    run = _workdir(model) / "finetuned" / f"{method}_{sparsity:.1f}_e{epochs}"
    pruned = run / "pruned"
    summary_path = run / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    start = time.perf_counter()
    if not (pruned / "ifjax_checkpoint.json").exists():
        prune = PruneOptions(
            checkpoint=trained["checkpoint"],
            out=pruned,
            sparsity=sparsity,
            method=method,
            importance="l1",
            overwrite=True,
        )
        jobs.prune_checkpoint(**prune.arguments())
    prune_seconds = time.perf_counter() - start
    evaluation = EvalOptions(checkpoint=pruned, test_subset=SETTINGS[model]["test_subset"])
    after_pruning = jobs.evaluate_checkpoint(**evaluation.arguments())["top1"]
    start = time.perf_counter()
    finetune = FinetuneOptions(
        checkpoint=pruned,
        workdir=run / "finetune",
        epochs=epochs,
        train_subset=SETTINGS[model].get("train_subset"),
    )
    tuned = jobs.finetune(**finetune.arguments())
    if not tuned["finished"]:
        raise RuntimeError(f"fine-tuning {run} stopped before the end; run again to resume")
    restored = jobs.restore(pruned)
    count = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree["params"]))
    dense = count(jobs.restore(trained["checkpoint"]).variables)
    summary = dict(
        model=model,
        method=method,
        sparsity=sparsity,
        finetune_epochs=epochs,
        base_top1=trained["test_top1"],
        pruned_top1=after_pruning,
        finetuned_top1=tuned["test_top1"],
        params=count(restored.variables),
        dense_params=dense,
        prune_seconds=prune_seconds,
        finetune_seconds=time.perf_counter() - start,
    )
    _write_text(summary_path, json.dumps(summary, indent=1) + "\n")
    return summary


def _finetuned_markdown(model, trained, rows, epochs) -> str:
    config = SETTINGS[model]
    table = paper.paper_finetuned(model, "cifar10") or {}
    by = {(r["sparsity"], r["method"]): r for r in rows}
    lines = [
        f"# Pruned and fine-tuned: {model} on CIFAR-10 (the paper's Table 1), ifjax vs the paper",
        "",
        *_base_lines(
            model,
            trained,
            extra=f"Fine-tuning: {epochs} epoch(s) of the paper's fine-tuning schedule "
            "(lr 0.01, SGD momentum 0.9) on all 50,000 training images, batch 128; the "
            "paper fine-tunes far longer on full-width models.",
        ),
        f"Regenerate: `{_command('finetuned', model)}`",
        "",
        "All groups pruned at once to the given neuron sparsity (l1 importance, BatchNorm "
        "folded, exact solver for Intra-Fusion), evaluated, then fine-tuned.",
        "",
        "| neuron sparsity | weights kept | Default pruned | IF pruned | Default fine-tuned | "
        "IF fine-tuned | gain after fine-tuning | paper Default | paper IF | paper gain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    agree = compared = 0
    for sparsity in FINETUNE_SPARSITIES:
        d, f = by[(sparsity, "default")], by[(sparsity, "intra_fusion")]
        gain = f["finetuned_top1"] - d["finetuned_top1"]
        theirs = table.get(round(sparsity, 6))
        if theirs is not None:
            _, paper_default, paper_fused = theirs
            paper_gain = paper_fused - paper_default
            compared += 1
            agree += _sign(gain) == _sign(paper_gain)
            paper_cols = f"{paper_default:.2f} | {paper_fused:.2f} | {paper_gain:+.2f}"
        else:
            paper_cols = "- | - | -"
        lines.append(
            f"| {sparsity:.0%} | {d['params'] / d['dense_params']:.1%} | "
            f"{d['pruned_top1']:.2f} | {f['pruned_top1']:.2f} | {d['finetuned_top1']:.2f} | "
            f"{f['finetuned_top1']:.2f} | {gain:+.2f} | {paper_cols} |"
        )
    lines += [""]
    if compared:
        lines += [
            f"The gain after fine-tuning has the paper's sign in {agree} of {compared} rows.",
            "",
        ]
    seconds = sum(r["finetune_seconds"] for r in rows)
    lines += [
        f"Fine-tuning took {seconds / 60:.1f} min in all ({config['width']} width, this "
        "machine; a resumed run counts only what it ran).",
        "",
        f"Raw rows: `reports/data/finetuned_{model}.csv`.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _write_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """A CSV of the rows (columns: every key, in order of appearance), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("base", "datafree", "finetuned", "check"):
        sub = commands.add_parser(name)
        sub.add_argument(
            "--model", choices=CNN_MODELS if name != "base" else tuple(SETTINGS), required=True
        )
        if name == "finetuned":
            sub.add_argument("--epochs", type=int, help="fine-tuning epochs (default: SETTINGS)")
        if name == "check":
            sub.add_argument("--cells", type=int, default=12, help="random cells to recompute")
    commands.add_parser("all")
    import fullwidth  # reports/fullwidth.py
    import fullwidth_device  # reports/fullwidth_device.py

    fullwidth.add_arguments(commands.add_parser("fullwidth", help=fullwidth.__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    if args.command == "fullwidth":
        return (fullwidth_device.main if args.device_run else fullwidth.main)(args)
    jobs.enable_compilation_cache(jobs.default_compilation_cache())
    if args.command == "base":
        print(json.dumps({k: v for k, v in base_model(args.model).items() if k != "history"}))
    elif args.command == "datafree":
        datafree(args.model)
    elif args.command == "finetuned":
        finetuned(args.model, args.epochs)
    elif args.command == "check":
        check(args.model, args.cells)
    else:
        for model in CNN_MODELS:
            datafree(model)
        for model in CNN_MODELS:
            finetuned(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
