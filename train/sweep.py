"""The paper's data-free experiment: prune one group at a time, no fine-tuning.

For every group x importance x sparsity, the BatchNorm-folded base model is pruned with
Default pruning and with Intra-Fusion and evaluated on the test split. BatchNorm is
folded once, and every cell is pruned in the same-shape *masked* form (pruned channels
zeroed, merged weights in place), which computes exactly the function of the physically
pruned model. All cells therefore share one compiled evaluation function: the sweep
costs one compilation of the model plus, per cell, planning and evaluation.

Results are rows of plain dicts (one per cell and method; accuracies in percent), written
as ``datafree.csv``, a markdown table in the paper's layout and PNG plots. When the model
and dataset are the paper's, the paper's numbers (:mod:`train.paper`) go alongside:
columns ``paper_default``, ``paper_intra_fusion``, ``paper_gain`` and ``sign_agrees``
(whether Intra-Fusion's gain over Default has the same sign here as in the paper).

"lamp" and the paper: the paper's "lamp" numbers come from the released code's scrambled
LAMP, ifjax's ``lamp_released``. With ``paper_lamp=True`` a requested "lamp" is scored
with ``lamp_released`` (column ``scoring``), so it can be compared with the paper.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import ifjax
from train import data as data_lib
from train import training
from train.paper import DatafreeTable

__all__ = [
    "CSV_COLUMNS",
    "METHOD_LABELS",
    "METHOD_VARIANTS",
    "PAPER_COLUMNS",
    "add_paper_columns",
    "datafree_sweep",
    "eval_batch_list",
    "markdown_table",
    "plot_datafree",
    "plot_gains",
    "scoring_importance",
    "select_groups",
    "sign_agreement",
    "taylor_gradients",
    "write_csv",
]

CSV_COLUMNS = (
    "model",
    "dataset",
    "group",
    "sparsity",
    "importance",
    "method",
    "top1",
    "base_top1",
    "gain",
    "scoring",
    "converged",
)
PAPER_COLUMNS = ("paper_default", "paper_intra_fusion", "paper_gain", "sign_agrees")
METHOD_LABELS = {
    "default": "Default",
    "intra_fusion": "Intra-Fusion",
    "intra_fusion_sinkhorn": "Intra-Fusion (Sinkhorn)",
    "intra_fusion_row_average": "Intra-Fusion (row average)",
    "intra_fusion_head_values": "Intra-Fusion (heads: values only)",
    "intra_fusion_head_map": "Intra-Fusion (heads: channel map)",
}
# Sweep method -> (ifjax method, settings replacing the sweep's own). "intra_fusion" uses
# the sweep's solver; the variants fix one setting each, so that one sweep can set the
# exact solver, Sinkhorn and the row-averaged map side by side on the same cells.
METHOD_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "default": ("default", {}),
    "intra_fusion": ("intra_fusion", {}),
    "intra_fusion_sinkhorn": ("intra_fusion", {"solver": "sinkhorn"}),
    "intra_fusion_row_average": ("intra_fusion", {"map_normalization": "row_average"}),
    "intra_fusion_head_values": ("intra_fusion", {"head_merge": "values"}),
    "intra_fusion_head_map": ("intra_fusion", {"head_merge": "map"}),
}
_PAIR = {"default", "intra_fusion"}
# ifjax importance -> the paper's name for the numbers it produced.
_PAPER_NAMES = {scoring: name for name, scoring in ifjax.PAPER_IMPORTANCES.items()}


def scoring_importance(importance: str, paper_lamp: bool) -> str:
    """The ifjax importance that scores a requested one: with ``paper_lamp``, the paper's
    (:func:`ifjax.paper_scoring`: "lamp" -> "lamp_released"), else itself."""
    scoring = ifjax.paper_scoring(importance)  # raises on an unknown importance
    return scoring if paper_lamp else importance


def select_groups(
    groups: Sequence[ifjax.Group], indices: str | Sequence[int]
) -> list[tuple[int, ifjax.Group]]:
    """``(index, group)`` pairs for "all" (every group but a transformer's residual
    stream, as :func:`ifjax.prune`), a kind ("channels", "neurons", "heads",
    "residual") or a list of group indices.

    Raises:
      ValueError: naming an index outside ``0..len(groups) - 1``.
    """
    if indices == "all":
        return [(i, g) for i, g in enumerate(groups) if g.kind != "residual"]
    if isinstance(indices, str):
        if indices not in ifjax.GROUP_KINDS:
            raise ValueError(f"unknown groups {indices!r}: 'all', a kind or indices")
        return [(i, g) for i, g in enumerate(groups) if g.kind == indices]
    for index in indices:
        if not 0 <= index < len(groups):
            raise ValueError(f"unknown group {index}: the model has groups 0..{len(groups) - 1}")
    return [(index, groups[index]) for index in indices]


def eval_batch_list(dataset: data_lib.Dataset, batch_size: int = 500) -> list[dict[str, Any]]:
    """The whole test split as device batches, built once and reused by every cell."""
    iterator = data_lib.batches(dataset, batch_size, shuffle=False, augment=False)
    return [jax.device_put(batch) for batch in iterator]


def taylor_gradients(
    model: Any, folded: Mapping[str, Any], train_set: data_lib.Dataset, *, seed: int = 0
) -> dict[str, Any]:
    """Loss gradients summed over ``ifjax.TAYLOR_BATCHES`` (5) batches of
    ``ifjax.TAYLOR_BATCH_SIZE`` (128) training images (the reference's taylor).

    The batches are the first five of a shuffled, augmented epoch (as the reference's
    training loader); the model runs in eval mode on the folded variables.
    """
    batch_size = min(ifjax.TAYLOR_BATCH_SIZE, len(train_set))
    iterator = data_lib.batches(train_set, batch_size, shuffle=True, augment=True, seed=seed)
    pairs = []
    for batch, _ in zip(iterator, range(ifjax.TAYLOR_BATCHES), strict=False):
        pairs.append((jnp.asarray(batch["image"]), jnp.asarray(batch["label"])))
    iterator.close()
    return ifjax.accumulate_gradients(model, folded, pairs)


def _pruner(method: str, sparsity: float, scoring: str, solver: str, epsilon: float):
    if method not in METHOD_VARIANTS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(METHOD_VARIANTS)}")
    kind, settings = METHOD_VARIANTS[method]
    if kind == "default":
        return ifjax.default_pruning(sparsity, scoring)
    options = dict(solver=solver, epsilon=epsilon) | settings
    return ifjax.intra_fusion(sparsity, scoring, **options)


def _cells(
    selected: list[tuple[int, ifjax.Group]],
    importances: Sequence[str],
    sparsities: Sequence[float],
    methods: Sequence[str],
) -> list[tuple[int, ifjax.Group, str, float, str]]:
    return [
        (index, group, importance, float(sparsity), method)
        for index, group in selected
        for importance in importances
        for sparsity in sparsities
        for method in methods
    ]


def _check_sweep(importances, sparsities, methods, gradients) -> None:
    for sparsity in sparsities:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    for method in methods:
        if method not in METHOD_LABELS:
            raise ValueError(f"unknown method {method!r}; choose from {tuple(METHOD_LABELS)}")
    if "taylor" in importances and gradients is None:
        raise ValueError("importance 'taylor' needs gradients (see taylor_gradients)")


def datafree_sweep(
    model: Any,
    variables: Mapping[str, Any],
    eval_batches: Sequence[Mapping[str, Any]],
    *,
    example_input: Any,
    groups: str | Sequence[int] = "all",
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    importances: Sequence[str] = ("l1",),
    methods: Sequence[str] = ("default", "intra_fusion"),
    solver: str = "exact",
    epsilon: float = 1e-3,
    paper_lamp: bool = False,
    gradients: Mapping[str, Any] | None = None,
    recalibration_batches: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    progress: bool = True,
    journal: str | os.PathLike | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Prunes one group at a time, Default vs Intra-Fusion, and evaluates without fine-tuning.

    Args:
      model: the (dense) Linen model of ``variables``.
      variables: ``{"params", "batch_stats"}`` of the trained base model (not folded).
      eval_batches: test batches (e.g. :func:`eval_batch_list`), reused by every cell.
      example_input: an input batch, (1, H, W, 3), to discover the groups.
      groups: "all" or group indices (0 = nearest the output).
      sparsities: fractions of a group's channels removed, each in [0, 1).
      importances: importance names ("l1", "lamp", "taylor", "random", ...).
      methods: any of :data:`METHOD_VARIANTS`: "default", "intra_fusion" (with
        ``solver``), "intra_fusion_sinkhorn", "intra_fusion_row_average".
      solver: Intra-Fusion's transport solver, "exact" or "sinkhorn".
      epsilon: Sinkhorn's relative entropic regularization.
      paper_lamp: score "lamp" with the released code's LAMP ("lamp_released").
      gradients: for taylor, from :func:`taylor_gradients` on the folded model.
      recalibration_batches: training batches (dicts with an ``"image"``); given, every
        pruned model's BatchNorm statistics are re-estimated on them
        (:func:`ifjax.recalibrate_batchnorm`) before it is evaluated, and each row's
        ``recalibrate`` is their image count (0 without: the paper's data-free setting).
      seed: seed of the keys of "random" importance.
      progress: show a progress bar (rate and ETA) on stderr.
      journal: a JSON-lines file that every finished cell is appended to (flushed and
        synced). A sweep started again with the same journal skips the cells it holds,
        so an interrupted sweep resumes. The journal records the settings and the base
        model's accuracy; a journal of other settings or another model is an error.
      stop_when: called before each cell still to run; when it returns True the sweep
        stops there and returns the rows so far (with a journal, a later call resumes
        from that cell). For runs under a time limit, e.g. ``lambda: time.monotonic() >
        end``.

    Returns:
      One dict per (group, importance, sparsity, method) with ``group``, ``sparsity``,
      ``importance``, ``method``, ``top1`` and ``base_top1`` (percent), ``gain`` (set by
      :func:`add_paper_columns`), ``scoring``, ``converged`` and ``recalibrate``.

    Example:
      >>> rows = datafree_sweep(model, variables, eval_batch_list(test_set),
      ...                       example_input=jnp.zeros((1, 32, 32, 3)), sparsities=(0.5,))
    """
    _check_sweep(importances, sparsities, methods, gradients)
    scorings = {name: scoring_importance(name, paper_lamp) for name in importances}
    all_groups = ifjax.discover_groups(model, variables, example_input)
    selected = select_groups(all_groups, groups)
    folded = ifjax.fold_batchnorm(variables, all_groups)
    base_top1 = 100 * training.evaluate(model, folded, eval_batches)["top1"]
    cells = _cells(selected, importances, sparsities, methods)
    recalibrate = sum(len(b["image"]) for b in recalibration_batches or ())
    settings = dict(
        solver=solver,
        epsilon=epsilon,
        paper_lamp=paper_lamp,
        seed=seed,
        base_top1=round(base_top1, 4),
        images=sum(len(batch["label"]) for batch in eval_batches),
    )
    settings |= {"recalibrate": recalibrate} if recalibrate else {}  # old journals resume
    done = _read_journal(journal, settings) if journal is not None else {}
    rows = []
    bar = tqdm.tqdm(
        cells, desc="data-free sweep", unit="cell", disable=not progress, file=sys.stderr
    )
    for cell_index, (index, group, importance, sparsity, method) in enumerate(bar):
        bar.set_postfix_str(f"group {index} {importance} {sparsity:.0%} {method}")
        finished = done.get((index, round(sparsity, 6), importance, method))
        if finished is not None:
            rows.append(finished)
            continue
        if stop_when is not None and stop_when():
            break
        pruner = _pruner(method, sparsity, scorings[importance], solver, epsilon)
        key = jax.random.fold_in(jax.random.key(seed), cell_index // len(methods))
        plan = pruner.plan(folded, group, gradients=gradients, key=key)
        masked = pruner.apply(folded, group, plan, masked=True)
        if recalibrate:
            masked = ifjax.recalibrate_batchnorm(model, masked, recalibration_batches)
        top1 = 100 * training.evaluate(model, masked, eval_batches)["top1"]
        row = dict(
            group=index,
            sparsity=sparsity,
            importance=importance,
            method=method,
            top1=top1,
            base_top1=base_top1,
            scoring=scorings[importance],
            converged=bool(plan.converged),
            recalibrate=recalibrate,
        )
        rows.append(row)
        if journal is not None:
            _append_journal(journal, settings, row)
    return rows


def _journal_key(row: Mapping[str, Any]) -> tuple[int, float, str, str]:
    return _cell_key(row) + (str(row["method"]),)


def _read_journal(path: str | os.PathLike, settings: Mapping[str, Any]) -> dict[tuple, dict]:
    """The rows of a sweep journal, keyed by (group, sparsity, importance, method)."""
    path = Path(path)
    if not path.exists():
        return {}
    done = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            recorded, row = entry["settings"], entry["row"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if number == len(lines):
                continue  # a line cut short by an interruption: that cell runs again
            raise ValueError(f"sweep journal {path} line {number} is corrupt: {error}") from None
        keys = set(settings) | set(recorded)
        differing = sorted(k for k in keys if recorded.get(k) != settings.get(k))
        if differing:
            raise ValueError(
                f"sweep journal {path} was written with other settings or another model "
                f"(differing: {', '.join(differing)}); use another journal or delete it"
            )
        done[_journal_key(row)] = row
    return done


def _append_journal(path: str | os.PathLike, settings: Mapping[str, Any], row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(dict(settings=settings, row=row)) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _cell_key(row: Mapping[str, Any]) -> tuple[int, float, str]:
    return int(row["group"]), round(float(row["sparsity"]), 6), str(row["importance"])


def _by_method(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, dict[str, float]]:
    table: dict[tuple, dict[str, float]] = {}
    for row in rows:
        table.setdefault(_cell_key(row), {})[row["method"]] = float(row["top1"])
    return table


def add_paper_columns(
    rows: Sequence[Mapping[str, Any]], paper: DatafreeTable | None
) -> list[dict[str, Any]]:
    """Adds ``gain`` (Intra-Fusion minus Default) and, with the paper's table, its numbers.

    The paper's columns are filled where the paper has the cell and the scoring is the
    one behind the paper's numbers (l1, taylor, and lamp scored as ``lamp_released``).

    Returns:
      New rows; ``sign_agrees`` is True/False, or "" where there is nothing to compare.
    """
    measured = _by_method(rows)
    out = []
    for row in rows:
        row = dict(row)
        both = measured[_cell_key(row)]
        has_both = _PAIR <= set(both)
        gain = both["intra_fusion"] - both["default"] if has_both else None
        row["gain"] = "" if gain is None else gain
        if paper is not None:
            paper_name = _PAPER_NAMES.get(row["scoring"])
            cell = paper.get((row["group"], round(row["sparsity"], 6), paper_name))
            paper_default, paper_fused = cell if cell is not None else ("", "")
            paper_gain = "" if cell is None else round(cell[1] - cell[0], 4)
            agrees = "" if "" in (paper_gain, row["gain"]) else _same_sign(gain, paper_gain)
            row.update(
                paper_default=paper_default,
                paper_intra_fusion=paper_fused,
                paper_gain=paper_gain,
                sign_agrees=agrees,
            )
        out.append(row)
    return out


def _same_sign(a: float, b: float) -> bool:
    return bool(np.sign(round(a, 6)) == np.sign(round(b, 6)))


def sign_agreement(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(cells whose gain has the paper's sign, cells compared), counting each cell once."""
    cells = {_cell_key(row): row["sign_agrees"] for row in rows if row.get("sign_agrees", "") != ""}
    return sum(bool(v) for v in cells.values()), len(cells)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Writes the rows with :data:`CSV_COLUMNS` (``recalibrate`` too where a row was
    recalibrated, and :data:`PAPER_COLUMNS` if present)."""
    path = Path(path)
    columns = list(CSV_COLUMNS)
    if any(row.get("recalibrate") for row in rows):
        columns.append("recalibrate")
    if rows and "sign_agrees" in rows[0]:
        columns += PAPER_COLUMNS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})
    return path


def _csv_value(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _format_gain(value: float | str) -> str:
    return "" if value == "" else f"{value:+.2f}"


def _table_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    sparsities = sorted({round(float(r["sparsity"]), 6) for r in rows})
    measured = _by_method(rows)
    paper = {_cell_key(r): r for r in rows if r.get("paper_gain", "") != ""}
    header = ["group", "importance", "", *(f"{s:.0%}" for s in sparsities)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = sorted({(int(r["group"]), str(r["importance"])) for r in rows})
    for group, importance in keys:
        cells = [measured.get((group, s, importance), {}) for s in sparsities]
        for method, label in METHOD_LABELS.items():
            if any(method in c for c in cells):
                values = [f"{c[method]:.2f}" if method in c else "" for c in cells]
                lines.append(f"| {group} | {importance} | {label} | " + " | ".join(values) + " |")
        if any(_PAIR <= set(c) for c in cells):
            gains = [
                _format_gain(c["intra_fusion"] - c["default"]) if _PAIR <= set(c) else ""
                for c in cells
            ]
            lines.append(f"| {group} | {importance} | gain | " + " | ".join(gains) + " |")
        if any((group, s, importance) in paper for s in sparsities):
            lines.append(
                f"| {group} | {importance} | paper gain | "
                + " | ".join(_paper_cell(paper.get((group, s, importance))) for s in sparsities)
                + " |"
            )
    return lines


def _paper_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return ""
    mark = "" if row["sign_agrees"] == "" else (" ✓" if row["sign_agrees"] else " ✗")
    return _format_gain(row["paper_gain"]) + mark


def markdown_table(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> str:
    """The data-free results in the paper's layout, as markdown.

    Rows are group x importance with sub-rows Default, Intra-Fusion and gain (and the
    paper's gain, marked ✓ where its sign agrees with ours); columns are sparsities.
    Accuracies are top-1 in percent.
    """
    lines = [f"## {title}", ""] if title else []
    if rows:
        lines.append(f"Base model top-1 (BatchNorm folded): {float(rows[0]['base_top1']):.2f}%")
        lines.append("")
    lines += _table_lines(rows)
    agree, compared = sign_agreement(rows)
    if compared:
        lines += ["", f"Gain sign agrees with the paper in {agree} of {compared} cells."]
    return "\n".join(lines) + "\n"


def _grid(count: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(3.2 * columns + 1.6, 2.6 * rows + 0.4),
        squeeze=False,
        sharex=True,
        layout="constrained",
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return plt, figure, list(axes.flat)


def _colours(plt, importances: Sequence[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(importances)}


def _series(rows, group: int, importance: str, value: str, method: str | None = None):
    """Sorted (sparsities, values) of one line of a plot; empty when there is none."""
    points = sorted(
        (float(r["sparsity"]), float(r[value]))
        for r in rows
        if int(r["group"]) == group
        and r["importance"] == importance
        and (method is None or r["method"] == method)
        and r.get(value, "") != ""
    )
    return tuple(zip(*points, strict=True)) if points else ((), ())


def _save(plt, figure, axes, path: str | os.PathLike, title: str, ylabel: str) -> Path:
    """Title, legend (right of the plots) and axis labels; writes the PNG."""
    handles, labels = axes[0].get_legend_handles_labels()
    figure.suptitle(title, fontsize=10)
    figure.legend(
        handles,
        labels,
        loc="outside right upper",
        fontsize=7,
        frameon=False,
        ncol=1,
    )
    figure.supxlabel("sparsity of the group", fontsize=8)
    figure.supylabel(ylabel, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_datafree(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Plots top-1 vs sparsity, one subplot per group: Default dashed, Intra-Fusion solid.

    The dotted grey line is the base model's accuracy. Written as PNG (matplotlib Agg).
    """
    groups = sorted({int(r["group"]) for r in rows})
    importances = sorted({str(r["importance"]) for r in rows})
    plt, figure, axes = _grid(len(groups))
    colours = _colours(plt, importances)
    for ax, group in zip(axes, groups, strict=False):
        for importance in importances:
            for method, style in (("default", "--o"), ("intra_fusion", "-s")):
                x, y = _series(rows, group, importance, "top1", method)
                label = f"{METHOD_LABELS[method]} ({importance})"
                if x:
                    ax.plot(x, y, style, color=colours[importance], ms=3, label=label)
        ax.axhline(float(rows[0]["base_top1"]), color="grey", lw=0.8, ls=":", label="base")
        ax.set_title(f"group {group}", fontsize=9)
        ax.tick_params(labelsize=7)
    title = title or "data-free pruning, one group at a time"
    return _save(plt, figure, axes, path, title, "top-1 (%)")


def plot_gains(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Plots Intra-Fusion's gain over Default vs sparsity per group: ours solid, the
    paper's dashed (rows from :func:`add_paper_columns`)."""
    groups = sorted({int(r["group"]) for r in rows})
    importances = sorted({str(r["importance"]) for r in rows})
    plt, figure, axes = _grid(len(groups))
    colours = _colours(plt, importances)
    for ax, group in zip(axes, groups, strict=False):
        for importance in importances:
            for value, style, who in (("gain", "-s", "ours"), ("paper_gain", "--o", "paper")):
                x, y = _series(rows, group, importance, value, "intra_fusion")
                if x:
                    label = f"{who} ({importance})"
                    ax.plot(x, y, style, color=colours[importance], ms=3, label=label)
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"group {group}", fontsize=9)
        ax.tick_params(labelsize=7)
    title = title or "gain of Intra-Fusion over Default: ours vs the paper"
    return _save(plt, figure, axes, path, title, "gain (points of top-1)")
