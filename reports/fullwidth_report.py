"""Writes ``reports/fullwidth.md`` and ``reports/gpu.md`` from the results of
``reports/fullwidth.py`` (see there); tables beside the paper's numbers, CSVs and plots."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fullwidth
import fullwidth_device
import label_smoothing
import numpy as np
import reproduce
import table1_scale

from train import paper, sweep

LABELS = {"vgg11_bn": "VGG11-BN", "resnet18": "ResNet18"}


def _device(result: Mapping[str, Any]) -> str:
    m = result["train"]["machine"]
    if m["platform"] == "gpu":
        return f"{m['device']} (jax {m['jax']})"
    return f"{m['cpu']}, {m['cores']} cores, no GPU (jax {m['jax']})"


def _recipe_line(train: Mapping[str, Any]) -> str:
    r = train["recipe"]
    dtype = r["compute_dtype"] or "float32"
    return (
        f"{r['epochs']} epochs, batch {r['batch_size']}, SGD Nesterov momentum 0.9, weight "
        f"decay 5e-4, one-cycle (warm-up 15% from {r['peak_lr'] / 10:g} to {r['peak_lr']:g}, "
        f"cosine to 0), crop + flip on the device, {dtype} steps"
        + (f", label smoothing {r['label_smoothing']:g}" if r.get("label_smoothing") else "")
    )


def _base_table(found: Mapping[str, Any]) -> list[str]:
    lines = [
        "| model | machine | recipe | epochs run | test top-1 | paper's base | training time |"
        " images/s (training) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in found["models"].items():
        t = result["train"]
        low, high = fullwidth.PAPER_BASE[name]
        lines.append(
            f"| {LABELS[name]} x{t['width']:g} | {_device(result)} | {_recipe_line(t)} | "
            f"{t['epochs_run']} | **{t['test_top1']:.2f}%** | {low:.1f}-{high:.1f}% | "
            f"{t['train_seconds'] / 60:.1f} min | {t['images_per_second']:.0f} |"
        )
    return lines


def _label_smoothing_lines(reports: Path) -> list[str]:
    """What reports/label_smoothing.md measured, and whether the recipes use it."""
    used = {name: r.label_smoothing for name, r in fullwidth.RECIPES.items() if name != "tiny"}
    rows = label_smoothing.read_rows(reports / "data" / label_smoothing.CSV.name)
    state = ", ".join(f"`{name}` {value:g}" for name, value in used.items())
    if not rows:
        return [f"Label smoothing of the recipes: {state}; not measured yet.", ""]
    per_seed = label_smoothing.differences(rows)
    setting = reproduce.SETTINGS[label_smoothing.MODEL]
    return [
        f'Label smoothing (the issue\'s "if it helps"): smoothing {label_smoothing.SMOOTHING:g} '
        f"changed {LABELS[label_smoothing.MODEL]} x{setting['width']:g}'s test top-1 by "
        f"{', '.join(f'{d:+.2f}' for d in per_seed)} points over {len(per_seed)} seeds "
        f"(mean {sum(per_seed) / len(per_seed):+.2f}; {setting['epochs']} epochs of the fast "
        "schedule on this CPU, [label_smoothing.md](label_smoothing.md)). Label smoothing of "
        f"the recipes: {state}.",
        "",
    ]


def _plot_training(found: Mapping[str, Any], path: Path) -> Path:
    """The test accuracy per epoch of each model; with no model's history at hand (results
    restored without it, :func:`_restored_lines`) the figure drawn from it is kept."""
    if path.exists() and not any(r["train"]["history"] for r in found["models"].values()):
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for name, result in found["models"].items():
        history = result["train"]["history"]
        if history:
            ax.plot(
                [r["epoch"] for r in history],
                [100 * r["test_top1"] for r in history],
                marker=".",
                label=f"{LABELS[name]} ({result['recipe']})",
            )
        low, high = fullwidth.PAPER_BASE[name]
        ax.axhspan(low, high, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(50, 100)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no curve yet (e.g. a run cut short): no legend
        ax.legend(fontsize=8)
    ax.set_title("Full-width training (bands: the paper's base accuracies)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _lost(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a restored run's record says was lost (``restored.json``'s ``lost``), else {}."""
    return (run.get("restored") or {}).get("lost", {})


def _restored_lines(found: Mapping[str, Any]) -> list[str]:
    """A line per run whose results were restored from an earlier report (``restored.json``,
    written where a machine holding a run's own files was wiped): what it was restored from
    and what is lost."""
    runs = [(name, r, _device(r)) for name, r in found["models"].items()]
    runs += [(name, r, "this CPU") for name, r in found.get("cpu_runs", {}).items()]
    lines = [
        f"- {LABELS[name]} trained on {where}: {r['restored']['note']}"
        for name, r, where in runs
        if r.get("restored")
    ]
    if not lines:
        return []
    return [
        "Results restored from earlier reports (their runs' own files were lost):",
        "",
        *lines,
        "",
    ]


def _absolute_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """How far our absolute accuracies are from the paper's, per method."""
    lines = []
    for method, column in (("default", "paper_default"), ("intra_fusion", "paper_intra_fusion")):
        pairs = [
            (r["top1"], float(r[column]))
            for r in rows
            if r["method"] == method and r.get(column, "") != ""
        ]
        if not pairs:
            continue
        diff = np.array([a - b for a, b in pairs])
        lines.append(
            f"- {sweep.METHOD_LABELS.get(method, method)}: ours minus the paper's top-1 over "
            f"{len(pairs)} cells: mean {diff.mean():+.2f}, median {np.median(diff):+.2f}, "
            f"within 1 point in {int(np.sum(np.abs(diff) <= 1))}, within 3 points in "
            f"{int(np.sum(np.abs(diff) <= 3))}."
        )
    return lines


def _first_conv_lines(name: str, cells: Mapping[tuple, Mapping[str, Any]]) -> list[str]:
    """The cells of the group farthest from the output (the first convolution)."""
    if not cells:
        return []
    group = max(k[0] for k in cells)
    lines = [
        f"Group {group} (the first convolution's output channels):",
        "",
        "| importance | sparsity | our Default | our gain | paper's Default | paper's gain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (g, sparsity, importance), c in sorted(cells.items(), key=lambda kc: (kc[0][2], kc[0][1])):
        if g != group or "intra_fusion" not in c or "default" not in c:
            continue
        paper_cols = (
            f"{c['paper_default']:.2f} | {c['paper_gain']:+.2f}" if "paper_gain" in c else "- | -"
        )
        lines.append(
            f"| {importance} | {sparsity:.0%} | {c['default']:.2f} | "
            f"{c['intra_fusion'] - c['default']:+.2f} | {paper_cols} |"
        )
    return lines


def _machine_name(machine: Mapping[str, Any]) -> str:
    if machine["platform"] == "cpu":
        return f"this CPU ({machine['cpu']}, {machine['cores']} cores, jax {machine['jax']})"
    return f"{machine['device']} (jax {machine['jax']})"


def _machines_line(importances: list[str], machines: Mapping[str, Any]) -> str:
    """Which machines evaluated each importance's sweep."""
    by_machine: dict[str, list[str]] = {}
    for importance in importances:
        known = machines.get(importance) or []
        known = [known] if isinstance(known, Mapping) else known  # one machine, as first kept
        names = [_machine_name(m) for m in known] or ["a machine not recorded"]
        by_machine.setdefault(" and ".join(names), []).append(importance)
    parts = [f"{', '.join(names)} on {machine}" for machine, names in by_machine.items()]
    return "Evaluated: " + "; ".join(parts) + "."


def _coverage_lines(rows: list[dict], importances: list[str]) -> list[str]:
    """A line per importance whose sweep has fewer evaluations than the fullest one."""
    counts = {i: sum(r["importance"] == i for r in rows) for i in importances}
    full = max(counts.values())
    lines = [
        f"{i}: {n} of {full} evaluations so far (the sweep resumes where it stopped); its "
        "summaries below cover those only."
        for i, n in counts.items()
        if n < full
    ]
    return [*lines, ""] if lines else []


def _datafree_section(name: str, result: Mapping[str, Any], reports: Path) -> list[str]:
    rows = result["datafree"]
    if not rows:
        return [f"Not run yet for {LABELS[name]}.", ""]
    table = paper.paper_datafree(name, "cifar10")
    label = dict(model=name, dataset="cifar10")
    rows = sweep.add_paper_columns([label | r for r in rows], table)
    csv_path = reproduce._write_rows(rows, reports / "data" / f"fullwidth_datafree_{name}.csv")
    cells = reproduce._cells(rows)
    plot = reproduce._plot_gain_maps(
        cells,
        f"{name} (full width)",
        reports / "figures" / f"fullwidth_datafree_{name}.png",
        fullwidth.SPARSITIES,
    )
    importances = sorted({r["importance"] for r in rows})
    groups = sorted({int(r["group"]) for r in rows})
    lines = [
        f"{len(rows)} evaluations: groups {groups[0]}-{groups[-1]} (0 nearest the output) x "
        f"{', '.join(f'{s:.0%}' for s in fullwidth.SPARSITIES)} x {', '.join(importances)} x "
        "Default / Intra-Fusion exact / Intra-Fusion Sinkhorn, one group at a time, BatchNorm "
        "folded, no data used; 'lamp' scored with the released code's LAMP, as the paper's "
        f"numbers. Base model, folded, on these test images: {rows[0]['base_top1']:.2f}%.",
        "",
        _machines_line(importances, result.get("datafree_machines", {})),
        "",
        *_coverage_lines(rows, importances),
        *reproduce._summary_lines(cells),
        "",
        "Absolute accuracies (the widths are the paper's now):",
        "",
        *_absolute_lines(rows),
        "",
        *reproduce._solver_lines(cells),
        "",
        *_first_conv_lines(name, cells),
        "",
        f"![gains]({plot.relative_to(reports).as_posix()})",
        "",
        "Where the sign differs from the paper's:",
        "",
        *reproduce._disagreements(cells, limit=10),
        "",
    ]
    for importance in importances:
        lines += [
            f"#### {importance}: gains per cell",
            "",
            *reproduce._gain_table(cells, importance, fullwidth.SPARSITIES),
            "",
        ]
    lines += [f"Raw rows: `{csv_path.relative_to(reports.parent).as_posix()}`.", ""]
    return lines


def _table1_pairs(rows: Sequence[Mapping[str, Any]]) -> dict[float, tuple[Mapping, Mapping]]:
    """Table 1's rows by sparsity: (Default's row, Intra-Fusion's row), where both are done."""
    by = {(round(r["sparsity"], 6), r["method"]): r for r in rows}
    return {
        s: (by[(s, "default")], by[(s, "intra_fusion")])
        for s in sorted({k[0] for k in by})
        if (s, "default") in by and (s, "intra_fusion") in by
    }


def _finetuned_gain(pair: tuple[Mapping, Mapping]) -> float:
    return pair[1]["finetuned_top1"] - pair[0]["finetuned_top1"]


def _table1_section(name: str, result: Mapping[str, Any], reports: Path) -> list[str]:
    rows = result["table1"]
    if not rows:
        return [f"Not run yet for {LABELS[name]}.", ""]
    csv_path = reproduce._write_rows(rows, reports / "data" / f"fullwidth_table1_{name}.csv")
    table = paper.paper_finetuned(name, "cifar10") or {}
    epochs = rows[0]["finetune_epochs"]
    lines = [
        f"All groups pruned at once (l1, BatchNorm folded, exact solver), evaluated, then "
        f"fine-tuned {epochs} epoch(s) (constant lr, batch as training; the paper "
        "fine-tunes far longer). Base: "
        f"{rows[0]['base_top1']:.2f}% (paper's base {next(iter(table.values()))[0]:.2f}%)."
        if table
        else f"Fine-tuned {epochs} epoch(s).",
        "",
        "| neuron sparsity | weights kept | Default pruned | IF pruned | Default fine-tuned | "
        "IF fine-tuned | gain after fine-tuning | paper Default | paper IF | paper gain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    agree = compared = 0
    for sparsity, (d, f) in _table1_pairs(rows).items():
        gain = _finetuned_gain((d, f))
        theirs = table.get(sparsity)
        paper_cols = "- | - | -"
        if theirs is not None:
            paper_gain = theirs[2] - theirs[1]
            compared += 1
            agree += reproduce._sign(gain) == reproduce._sign(paper_gain)
            paper_cols = f"{theirs[1]:.2f} | {theirs[2]:.2f} | {paper_gain:+.2f}"
        lines.append(
            f"| {sparsity:.0%} | {d['params'] / d['dense_params']:.1%} | {d['pruned_top1']:.2f} | "
            f"{f['pruned_top1']:.2f} | {d['finetuned_top1']:.2f} | {f['finetuned_top1']:.2f} | "
            f"{gain:+.2f} | {paper_cols} |"
        )
    if compared:
        lines += ["", f"The gain after fine-tuning has the paper's sign in {agree}/{compared} rows"]
    lines += ["", f"Raw rows: `{csv_path.relative_to(reports.parent).as_posix()}`.", ""]
    return lines


def _paired(rows, method="intra_fusion"):
    """(our gain, paper's gain) per cell that the paper has."""
    cells = reproduce._cells(rows)
    return [
        (c[method] - c["default"], c["paper_gain"])
        for c in cells.values()
        if method in c and "default" in c and "paper_gain" in c
    ], cells


def _summary(found: Mapping[str, Any]) -> list[str]:
    """Where we agree with the paper and where not, in numbers; then what is not run yet."""
    lines = []
    for name, result in found["models"].items():
        t, label = result["train"], LABELS[name]
        low, high = fullwidth.PAPER_BASE[name]
        check = result.get("check")
        checked = (
            f" (the returned weights evaluated on this CPU: {check['top1']:.2f}%)" if check else ""
        )
        lines.append(
            f"- **{label} base model**: {t['test_top1']:.2f}% after {t['epochs_run']} epochs on "
            f"{_device(result)}{checked}, against the paper's {low:.1f}-{high:.1f}% after 300 "
            f"epochs: {t['test_top1'] - low:+.1f} points from the paper's low end."
        )
        rows = _with_paper(name, result["datafree"])
        pairs, cells = _paired(rows)
        if pairs:
            ours, theirs = np.array(pairs).T
            agree, corr = reproduce._agreement(ours, theirs)
            lines.append(
                f"- **{label} data-free** ({len(pairs)} of our {len(cells)} cells are in the "
                f"paper; {', '.join(sorted({r['importance'] for r in rows}))}): Intra-Fusion's "
                f"gain over Default has the paper's sign in {agree}/{len(pairs)} cells; the gains "
                f"correlate at {corr:.2f}; our mean gain {ours.mean():+.2f} vs the paper's "
                f"{theirs.mean():+.2f} points."
            )
            first = max(k[0] for k in cells)
            firsts = [
                (c["intra_fusion"] - c["default"], c.get("paper_gain"))
                for k, c in cells.items()
                if k[0] == first and "intra_fusion" in c and "default" in c
            ]
            worse = sum(g < 0 for g, _ in firsts)
            paper_has = [p for _, p in firsts if p is not None]
            lines.append(
                f"  - first convolution (group {first}): Intra-Fusion is worse than Default in "
                f"{worse}/{len(firsts)} of its cells"
                + (
                    f"; the paper's in {sum(p < 0 for p in paper_has)}/{len(paper_has)}."
                    if paper_has
                    else "; the paper has no numbers for this group."
                )
            )
        table = paper.paper_finetuned(name, "cifar10") or {}
        gains = [
            (_finetuned_gain(pair), table[s][2] - table[s][1])
            for s, pair in _table1_pairs(result["table1"]).items()
            if s in table
        ]
        if gains:
            agree = sum(reproduce._sign(a) == reproduce._sign(b) for a, b in gains)
            epochs = result["table1"][0]["finetune_epochs"]
            lines.append(
                f"- **{label} Table 1**: after {epochs} fine-tuning epoch(s) the gain has the "
                f"paper's sign in {agree}/{len(gains)} rows; our gains "
                f"({', '.join(f'{a:+.2f}' for a, _ in gains)}) vs the paper's "
                f"({', '.join(f'{b:+.2f}' for _, b in gains)}): so short a fine-tune leaves "
                "both models far from convergence, where the start still weighs."
            )
    lines += _scale_lines(found.get("reports"))
    for name, run in found.get("cpu_runs", {}).items():
        shown = found["models"].get(name)
        if shown is not None and shown.get("recipe") != "cpu" and run["train"]:
            lines.append(_other_model_line(name, run, shown))
    missing = []
    for name, result in found["models"].items():
        counts = collections.Counter(r["importance"] for r in result["datafree"])
        full = max(counts.values(), default=0)
        left = [i for i in fullwidth.IMPORTANCES if i not in counts]
        left += [f"{i} ({n} of {full} evaluations so far)" for i, n in counts.items() if n < full]
        if left:
            missing.append(f"{LABELS[name]}'s data-free {', '.join(left)}")
        rows = len(result["table1"])
        wanted = 2 * len(fullwidth.TABLE1_SPARSITIES)
        if rows < wanted:
            missing.append(f"{LABELS[name]}'s Table 1 ({rows}/{wanted} rows)")
    if not found["replicas"]:
        missing.append("the replicas bench")
    if missing:
        lines.append(f"- **Not run yet**: {'; '.join(missing)}.")
    if "runs" in found:
        lines.append(f"- {_plan_line(fullwidth_device.device_work(found['runs']))}")
    return lines


def _scale_lines(reports: Path | None) -> list[str]:
    """The summary's line on why Intra-Fusion fine-tunes worse at high sparsity
    (``reports/table1_scale.md``), from its rows."""
    rows = table1_scale.read_rows(reports / "data" / table1_scale.CSV.name) if reports else []
    reduced = reproduce.SETTINGS[table1_scale.MODEL]["width"]
    table = table1_scale.summary(table1_scale.of_width(rows, reduced))
    full = table1_scale.summary(table1_scale.of_width(rows, table1_scale.FULL_WIDTH["width"]))
    high = max((k[0] for k in table), default=None)
    if high is None or (high, "norm_matched") not in table or (high, "intra_fusion") not in table:
        return []
    released, matched = table[(high, "intra_fusion")], table[(high, "norm_matched")]
    return [
        f"- **Why Intra-Fusion falls behind after fine-tuning at {high:.0%}** "
        f"([table1_scale.md](table1_scale.md), VGG11-BN x0.25 on this CPU): the released merge "
        "sums the merged channels' rows with coefficients adding up to n/m, which leaves the "
        f"kernels up to {released['max_ratio']:.1f}x as large as Default's; BatchNorm makes "
        "that scale invisible to the network but not to the learning rate. The same network "
        "with every layer scaled to Default's norms gains "
        f"{matched['gain']:+.2f} points over Default after the same fine-tune, where the "
        f"released one gains {released['gain']:+.2f}"
        + (
            f"; at full width (a {table1_scale.FULL_WIDTH['epochs']}-epoch model) "
            f"{full[(high, 'norm_matched')]['gain']:+.2f} where the released one gains "
            f"{full[(high, 'intra_fusion')]['gain']:+.2f}."
            if (high, "norm_matched") in full and (high, "intra_fusion") in full
            else "."
        )
    ]


def _plan_line(work: Mapping[str, Any]) -> str:
    """What the next GPU session does (:func:`fullwidth_device.device_work`), in words."""
    waiting = [*work["models"], *work["stale"]]
    planned = [
        f"{LABELS[name]} trained with the current recipe "
        f"({fullwidth.RECIPES['gpu'].epochs[name]} epochs), then its Table 1 and data-free "
        "sweep"
        for name in waiting[:1]
    ]
    planned += ["the replicas bench"] if work["replicas"] else []
    planned += ["the training-step bench"] if work["bench"] else []
    text = (
        "**Next GPU session** (`--device-run prepare` plans it from what is missing): "
        f"{'; '.join(planned)}."
        if planned
        else "**Nothing is left for a GPU.**"
    )
    epochs = fullwidth.RECIPES["gpu"].epochs
    for name in waiting[1:]:
        text += (
            f" A later session trains {LABELS[name]} with the current recipe "
            f"({epochs[name]} epochs)"
            + ("; until then its present results, whole, stand." if name in work["stale"] else ".")
        )
    if work["datafree_here"]:
        here = ", ".join(f"{LABELS[name]}'s" for name in work["datafree_here"])
        text += f" Continuing on this CPU with the returned weights: {here} data-free sweep."
    return text


def _cpu_mode_section(runs: Mapping[str, Any], shown: Mapping[str, Any]) -> list[str]:
    """This CPU's own full-width runs (the ``cpu`` recipe), finished or under way."""
    if not runs:
        return []
    recipe = fullwidth.RECIPES["cpu"]
    lines = ["## CPU mode: the same command on this 2-core CPU", ""]
    for name in runs:
        recorded = fullwidth._recorded_recipe(recipe, recipe.epochs[name])
        lines.append(f"{LABELS[name]}, recipe `cpu`: {_recipe_line({'recipe': recorded})}.")
    lines += [
        "It checkpoints every 100 steps and resumes across runs of at most about 2 hours.",
        "",
        "| model | steps done | epochs evaluated | last test top-1 | images/s (median epoch) "
        "| data-free evaluations | Table 1 rows | the report's model |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, run in runs.items():
        history, trained = run["history"], run["train"]
        step = trained["epochs_run"] * trained["steps_per_epoch"] if trained else run["step"]
        if history:
            epochs, last = len(history), f"{100 * history[-1]['test_top1']:.2f}%"
            rate = f"{np.median([r['images_per_second'] for r in history]):.0f}"
        elif trained:  # its history lost (restored results): what train.json recorded
            epochs, last = trained["epochs_run"], f"{trained['test_top1']:.2f}%"
            rate = f"{trained['images_per_second']:.0f}"
        else:
            epochs, last, rate = 0, "-", "-"
        lost = _lost(run)
        datafree = (
            f"{lost['datafree_rows']} (rows lost)"
            if not run["datafree"] and lost.get("datafree_rows")
            else len(run["datafree"])
        )
        used = shown.get(name, {}).get("recipe") == "cpu"
        lines.append(
            f"| {LABELS[name]} x1 | {step} of {run['steps']} | {epochs} | {last} | "
            f"{rate} | {datafree} | {len(run['table1'])} | "
            f"{'this run' if used else 'the GPU run'} |"
        )
    lines += [
        "",
        "Training ResNet18 at full width is left to a GPU (an epoch here takes about 4x "
        "VGG11-BN's).",
        "",
    ]
    for name, run in runs.items():
        if name in shown and shown[name].get("recipe") != "cpu":
            lines += _beside_lines(name, run, shown[name])
    return lines


def _with_paper(name: str, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    label = dict(model=name, dataset="cifar10")
    return sweep.add_paper_columns([label | r for r in rows], paper.paper_datafree(name, "cifar10"))


def _common_cells(name: str, run: Mapping[str, Any], shown: Mapping[str, Any]):
    """The data-free cells of this CPU's model (``run``) and of the report's (``shown``), and
    the keys of those both have finished (Default and both Intra-Fusion variants)."""
    methods = reproduce.METHODS[:3]  # Default, Intra-Fusion exact and Sinkhorn
    here = reproduce._cells(_with_paper(name, run["datafree"]))
    there = reproduce._cells(_with_paper(name, shown["datafree"]))
    common = sorted(
        k for k in here if k in there and all(m in here[k] and m in there[k] for m in methods)
    )
    return here, there, common


def _between_models(here, there, common) -> tuple[list[list[float]], int, float]:
    """Intra-Fusion's (exact) gains of the two models over ``common``, the cells where their
    signs agree, and their correlation."""
    gains = [[reproduce._gain(c[k]) for k in common] for c in (here, there)]
    return gains, *reproduce._agreement(*gains)


def _other_model_line(name: str, run: Mapping[str, Any], shown: Mapping[str, Any]) -> str:
    """The summary's line on this CPU's own model, set against the report's model."""
    label, other = LABELS[name], _device(shown)
    text = (
        f"- **{label} trained on this CPU** (recipe `cpu`): {run['train']['test_top1']:.2f}% "
        f"after {run['train']['epochs_run']} epochs"
    )
    here, there, common = _common_cells(name, run, shown)
    lost = _lost(run)
    if not common and lost.get("summary"):
        text += lost["summary"]
    if common:
        gains, same, corr = _between_models(here, there, common)
        text += (
            f"; over the {len(common)} data-free cells both models have "
            f"({', '.join(sorted({k[2] for k in common}))}), Intra-Fusion's gain has the same "
            f"sign as the model trained on {other} in {same}/{len(common)} and correlates with "
            f"it at {corr:.2f} (mean {np.mean(gains[0]):+.2f} vs {np.mean(gains[1]):+.2f} "
            "points)"
        )
        first = max(k[0] for k in common)
        worse = [
            sum(reproduce._gain(c[k]) < 0 for k in common if k[0] == first) for c in (here, there)
        ]
        cells = sum(k[0] == first for k in common)
        text += (
            f"; on the first convolution (group {first}) Intra-Fusion is worse than Default in "
            f"{worse[0]}/{cells} of its cells (the other model: {worse[1]}/{cells})"
        )
    mine, theirs = _table1_pairs(run["table1"]), _table1_pairs(shown["table1"])
    both = [s for s in mine if s in theirs]
    if both:
        text += (
            f"; Table 1 at {', '.join(f'{s:.0%}' for s in both)}: gains after fine-tuning "
            f"{', '.join(f'{_finetuned_gain(mine[s]):+.2f}' for s in both)} vs "
            f"{', '.join(f'{_finetuned_gain(theirs[s]):+.2f}' for s in both)}"
        )
    return text + " (details under CPU mode)."


def _beside_lines(name: str, run: Mapping[str, Any], shown: Mapping[str, Any]) -> list[str]:
    """This CPU's own model's data-free and Table 1 results beside those of the report's
    model (trained elsewhere) and the paper's, over the cells and rows both have: a second,
    independently trained model at full width shows which findings are the method's and
    which belong to one set of weights."""
    here, there, common = _common_cells(name, run, shown)
    lost = _lost(run) if not common else {}
    if not common and not run["table1"] and not lost.get("datafree_section"):
        return []
    label, other = LABELS[name], _device(shown)
    lines = [
        f"### {label} trained here, beside the report's model (trained on {other})",
        "",
        f"This CPU's own {label} ({run['train']['test_top1']:.2f}% after "
        f"{run['train']['epochs_run']} epochs) went through the same stages on this CPU. Over "
        "the cells and rows both models have, a second, independently trained model shows "
        "which findings are the method's and which belong to one set of weights.",
        "",
    ]
    if common:
        columns = [[c[k] for k in common] for c in (here, there)]
        measures = [
            ("base top-1, folded", lambda cs: f"{cs[0]['base']:.2f}"),
            ("Default top-1, mean", lambda cs: f"{np.mean([c['default'] for c in cs]):.2f}"),
        ]
        for method in reproduce.METHODS[1:3]:
            variant = reproduce.LABELS[method]
            measures += [
                (
                    f"{variant}: mean gain",
                    lambda cs, m=method: f"{np.mean([reproduce._gain(c, m) for c in cs]):+.2f}",
                ),
                (
                    f"{variant}: better / equal / worse than Default",
                    lambda cs, m=method: reproduce._better_equal_worse(
                        [reproduce._gain(c, m) for c in cs]
                    ),
                ),
            ]
        lines += [
            f"Data-free, the {len(common)} cells both have "
            f"({', '.join(sorted({k[2] for k in common}))}; groups {common[0][0]}-"
            f"{max(k[0] for k in common)}):",
            "",
            f"| | this CPU's model | the model trained on {other} |",
            "|---|---:|---:|",
            *(
                f"| {text} | {value(columns[0])} | {value(columns[1])} |"
                for text, value in measures
            ),
        ]
        in_paper = [k for k in common if "paper_gain" in here[k]]
        if in_paper:
            theirs = [here[k]["paper_gain"] for k in in_paper]
            agree = [
                reproduce._agreement([reproduce._gain(c[k]) for k in in_paper], theirs)
                for c in (here, there)
            ]
            lines += [
                f"| {reproduce.LABELS['intra_fusion']}: sign agrees with the paper "
                f"({len(in_paper)} cells) | {agree[0][0]}/{len(in_paper)} | "
                f"{agree[1][0]}/{len(in_paper)} |",
                f"| {reproduce.LABELS['intra_fusion']}: correlation with the paper's gains | "
                f"{agree[0][1]:.2f} | {agree[1][1]:.2f} |",
            ]
        gains, same, corr = _between_models(here, there, common)
        difference = np.abs(np.subtract(*gains))
        lines += [
            "",
            f"Between the two models, {reproduce.LABELS['intra_fusion']}'s gain has the same "
            f"sign in {same}/{len(common)} cells and correlates at {corr:.2f}; it differs by "
            f"{difference.mean():.2f} points on average (max {difference.max():.2f}).",
            "",
        ]
        first = max(k[0] for k in common)
        lines += [
            f"Group {first} (the first convolution's output channels), both models:",
            "",
            "| importance | sparsity | Default, this CPU's model | gain | Default, the other "
            "model | gain | paper's Default | paper's gain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key in sorted((k for k in common if k[0] == first), key=lambda k: (k[2], k[1])):
            a, b = here[key], there[key]
            paper_cols = (
                f"{a['paper_default']:.2f} | {a['paper_gain']:+.2f}"
                if "paper_gain" in a
                else "- | -"
            )
            lines.append(
                f"| {key[2]} | {key[1]:.0%} | {a['default']:.2f} | {reproduce._gain(a):+.2f} | "
                f"{b['default']:.2f} | {reproduce._gain(b):+.2f} | {paper_cols} |"
            )
        lines.append("")
    elif lost.get("datafree_section"):  # the rows are lost: the section as generated then
        lines += [
            f"The data-free comparison below was {lost['datafree_section_date']} from this "
            "model's rows, since lost:",
            "",
            *lost["datafree_section"],
            "",
        ]
    if run["table1"]:
        lines += _table1_beside(name, run, shown)
    return lines


def _table1_beside(name: str, run: Mapping[str, Any], shown: Mapping[str, Any]) -> list[str]:
    table = paper.paper_finetuned(name, "cifar10") or {}
    here, elsewhere, other = run["table1"], _table1_pairs(shown["table1"]), _device(shown)

    def steps(result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
        trained = result["train"]
        return (
            f"{rows[0]['finetune_epochs'] * trained['steps_per_epoch']} steps of batch "
            f"{trained['recipe']['batch_size']}"
        )

    lines = [
        f"Table 1: each model fine-tuned with its training batch, {steps(run, here)} here"
        + (f", {steps(shown, shown['table1'])} on {other}" if shown["table1"] else "")
        + " (the same constant learning rate 0.01 per batch of 128, scaled linearly).",
        "",
        "| neuron sparsity | Default pruned | IF pruned | Default fine-tuned | IF fine-tuned | "
        f"gain, this CPU's model | gain, the model trained on {other} | paper gain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sparsity, (d, f) in _table1_pairs(here).items():
        other_gain = _finetuned_gain(elsewhere[sparsity]) if sparsity in elsewhere else None
        paper_gain = table[sparsity][2] - table[sparsity][1] if sparsity in table else None
        lines.append(
            f"| {sparsity:.0%} | {d['pruned_top1']:.2f} | {f['pruned_top1']:.2f} | "
            f"{d['finetuned_top1']:.2f} | {f['finetuned_top1']:.2f} | "
            f"{_finetuned_gain((d, f)):+.2f} | "
            + " | ".join("-" if g is None else f"{g:+.2f}" for g in (other_gain, paper_gain))
            + " |"
        )
    return [*lines, ""]


def write_fullwidth(found: Mapping[str, Any], reports: Path) -> list[Path]:
    plot = _plot_training(found, reports / "figures" / "fullwidth_training.png")
    lines = [
        "# The paper at full width: VGG11-BN and ResNet18 on CIFAR-10",
        "",
        "Regenerate: `python reports/reproduce.py fullwidth` (this CPU: VGG11-BN, resumable "
        "over several runs), or on one GPU `python reports/reproduce.py fullwidth "
        "--device-run prepare`, the device commands it prints, then `--device-run unpack "
        "DIR` (see `reports/fullwidth_device.py`). Training ResNet18 at full width is a GPU-only "
        "stage: on this 2-core CPU an epoch takes about 4x VGG11-BN's; its data-free sweep "
        "can go on here with the weights a GPU returned.",
        "",
        "Data: the offline CIFAR-10 JPEG export (50,000 / 10,000), read from the zip (or its "
        "packed copy) without tfds; JPEG pixels differ slightly from the original release.",
        "",
        "Every number below names the machine that measured it. The recipe of each base model "
        "is the one its run recorded; `RECIPES` in `reports/fullwidth.py` holds the one the "
        "next run uses.",
        "",
        *_restored_lines(found),
        "## Summary: where we agree with the paper and where not",
        "",
        *_summary(found),
        "",
        "## Base models",
        "",
        *_base_table(found),
        "",
        f"![training]({plot.relative_to(reports).as_posix()})",
        "",
        *_label_smoothing_lines(reports),
    ]
    lines += _cpu_mode_section(found.get("cpu_runs", {}), found["models"])
    for name, result in found["models"].items():
        lines += [
            f"## {LABELS[name]}: data-free pruning (model trained on {_device(result)})",
            "",
            *_datafree_section(name, result, reports),
            f"## {LABELS[name]}: Table 1, pruned and fine-tuned (machine: {_device(result)})",
            "",
            *_table1_section(name, result, reports),
        ]
    return [reproduce._write_text(reports / "fullwidth.md", "\n".join(lines)), plot]


def write_gpu(found: Mapping[str, Any], reports: Path) -> Path:
    bench, replicas = found["bench"], found["replicas"]
    machines = {r["machine"]["device"] for r in [*bench, *replicas] if "machine" in r}
    lines = [
        "# ifjax on a GPU: training-step throughput and split-data replicas",
        "",
        f"Device: {', '.join(sorted(machines)) or '?'}. Measured by `reports/reproduce.py "
        "fullwidth` (stages `bench` and `replicas`, see `reports/fullwidth.py`).",
        "",
        "## A training step, ifjax vs PyTorch",
        "",
        "Synthetic CIFAR-sized batches already on the device; SGD Nesterov with weight "
        "decay; each number the median of 3 timings of the same number of steps after a "
        "warm-up. ifjax: `train.training.train_step` (jit, mixed precision as in training); "
        "PyTorch: eager, channels_last, autocast to the same dtype, cudnn.benchmark.",
        "",
        "| model | batch | dtype | ifjax images/s | PyTorch images/s | ifjax / PyTorch | "
        "ifjax first step (compile) s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["batch_size"], r["framework"]): r for r in bench}
    for model, batch in sorted({(r["model"], r["batch_size"]) for r in bench}):
        ours, theirs = by.get((model, batch, "ifjax"), {}), by.get((model, batch, "torch"), {})
        rate = lambda r: f"{r['images_per_second']:.0f}" if "images_per_second" in r else "failed"
        ratio = (
            f"{ours['images_per_second'] / theirs['images_per_second']:.2f}x"
            if "images_per_second" in ours and "images_per_second" in theirs
            else "-"
        )
        first = f"{ours['first_step_seconds']:.1f}" if "first_step_seconds" in ours else "-"
        lines.append(
            f"| {LABELS.get(model, model)} | {batch} | {ours.get('compute_dtype', '?')} | "
            f"{rate(ours)} | {rate(theirs)} | {ratio} | {first} |"
        )
    errors = [r for r in bench if "error" in r]
    if errors:
        lines.append("")
        lines += [
            f"- {r['model']} {r['batch_size']} {r['framework']}: {r['error']}" for r in errors
        ]
    lines += ["", "## Split-data training: k replicas at once vs k separate runs", ""]
    if replicas:
        r0 = replicas[0]
        lines += [
            f"{LABELS.get(r0['model'], r0['model'])} x{r0['width']:g}, batch "
            f"{r0['batch_per_replica']} per replica, {r0['steps']} timed steps (float32, "
            "`bench/replicas.py`).",
            "",
            "| k | mode | s per step (all k) | images/s | speedup vs separate runs | compile s |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        separate = {r["k"]: r["run"] for r in replicas if r["mode"] == "separate runs"}
        for r in replicas:
            base = separate.get(r["k"])
            speedup = f"{base / r['run']:.2f}x" if base else "-"
            mode = r["mode"] + (" (auto)" if r.get("auto") else "")
            lines.append(
                f"| {r['k']} | {mode} | {r['run'] / r['steps']:.4f} | "
                f"{r['images_per_second']:.0f} | {speedup} | {r['compile']:.1f} |"
            )
    else:
        lines.append(
            "Not measured yet: the next GPU session runs it (`--device-run prepare` plans "
            "it). This CPU's numbers, for comparison: [bench/README.md](../bench/README.md)."
        )
    return reproduce._write_text(reports / "gpu.md", "\n".join(lines) + "\n")
