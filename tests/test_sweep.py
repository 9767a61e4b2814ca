"""Tests of train/sweep.py (the data-free sweep, tables, plots) and train/paper.py."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables

import ifjax
from models import VGG
from tests.conftest import require_shared
from train import data, paper, sweep, training

SPARSITIES = (0.0, 0.5)
MODEL = VGG(cfg=(4, "M", 8, "M"), num_classes=10)
EXAMPLE = jnp.zeros((1, 8, 8, 3), jnp.float32)


@pytest.fixture(scope="module")
def base():
    """A tiny VGG with random weights and BN statistics, and a test set it labels itself."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    variables = random_variables(MODEL, jnp.zeros((2, 8, 8, 3)), seed=3)
    logits = MODEL.apply(variables, jnp.asarray(data.normalize(images)))
    labels = np.array(jnp.argmax(logits, -1), np.int32)
    labels[::4] = (labels[::4] + 1) % 10  # base top-1 75%: pruning can gain or lose
    test_set = data.ArrayDataset(images, labels, 10, "toy", "test")
    return variables, test_set, sweep.eval_batch_list(test_set, batch_size=20)


@pytest.fixture(scope="module")
def rows(base):
    variables, test_set, batches = base
    gradients = sweep.taylor_gradients(
        MODEL, ifjax.fold_batchnorm(variables, _groups(variables)), test_set
    )
    return sweep.datafree_sweep(
        MODEL,
        variables,
        batches,
        example_input=EXAMPLE,
        sparsities=SPARSITIES,
        importances=("l1", "taylor"),
        gradients=gradients,
        progress=False,
    )


def _groups(variables):
    return ifjax.discover_groups(MODEL, variables, EXAMPLE)


def _top1_by_hand(model, variables, test_set) -> float:
    """Top-1 in percent, computed without train.training."""
    logits = model.apply(variables, jnp.asarray(data.normalize(test_set.images)), train=False)
    return 100 * float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test_set.labels))


def test_sweep_has_one_row_per_cell_and_method(rows):
    assert len(rows) == 2 * 2 * len(SPARSITIES) * 2  # groups x importances x sparsities x methods
    cells = {(r["group"], r["importance"], r["sparsity"], r["method"]) for r in rows}
    assert len(cells) == len(rows)
    assert {r["group"] for r in rows} == {0, 1}
    assert all(r["converged"] for r in rows)


def test_base_accuracy_is_the_models(rows, base):
    variables, test_set, _ = base
    assert rows[0]["base_top1"] == pytest.approx(75.0)
    assert rows[0]["base_top1"] == _top1_by_hand(MODEL, variables, test_set)


def test_zero_sparsity_cells_equal_the_base_model(rows):
    zero = [r for r in rows if r["sparsity"] == 0.0]
    assert len(zero) == 8
    for row in zero:
        assert row["top1"] == row["base_top1"], row


@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_masked_cells_equal_physically_pruned_models(rows, base, method):
    variables, test_set, _ = base
    gradients = sweep.taylor_gradients(
        MODEL, ifjax.fold_batchnorm(variables, _groups(variables)), test_set
    )
    for row in rows:
        if row["method"] != method or row["sparsity"] == 0.0:
            continue
        pruned_model, pruned, _ = ifjax.prune(
            MODEL,
            variables,
            row["group"],
            sparsity=row["sparsity"],
            method=method,
            importance=row["importance"],
            example_input=EXAMPLE,
            gradients=gradients if row["importance"] == "taylor" else None,
        )
        assert pruned_model != MODEL  # physically smaller
        assert row["top1"] == _top1_by_hand(pruned_model, pruned, test_set), row


def test_sweep_compiles_the_evaluation_once(base, monkeypatch):
    variables, _, batches = base
    original = training.eval_step
    traces = []

    def counting(variables, batch, *, model):
        traces.append(model)
        return original.__wrapped__(variables, batch, model=model)

    monkeypatch.setattr(training, "eval_step", jax.jit(counting, static_argnames="model"))
    rows = sweep.datafree_sweep(
        MODEL,
        variables,
        batches,
        example_input=EXAMPLE,
        sparsities=(0.25, 0.75),
        importances=("lamp", "random"),
        progress=False,
    )
    assert len(rows) == 2 * 2 * 2 * 2
    assert len({r["top1"] for r in rows}) > 1
    assert len(traces) == 1  # the base model and all 16 cells share one compiled function


def test_method_variants_equal_the_pruners_they_name(base):
    """Sinkhorn and row-average variants are Intra-Fusion with that one setting changed."""
    variables, test_set, batches = base
    methods = tuple(sweep.METHOD_VARIANTS)
    rows = sweep.datafree_sweep(
        MODEL,
        variables,
        batches,
        example_input=EXAMPLE,
        groups=[1],
        sparsities=(0.5,),
        methods=methods,
        progress=False,
    )
    assert [r["method"] for r in rows] == list(methods)
    folded = ifjax.fold_batchnorm(variables, _groups(variables))
    group = _groups(variables)[1]
    pruners = {
        "intra_fusion_sinkhorn": ifjax.intra_fusion(0.5, solver="sinkhorn"),
        "intra_fusion_row_average": ifjax.intra_fusion(0.5, map_normalization="row_average"),
        "intra_fusion_head_values": ifjax.intra_fusion(0.5, head_merge="values"),
        "intra_fusion_head_map": ifjax.intra_fusion(0.5, head_merge="map"),
    }
    for row in rows[2:]:
        pruner = pruners[row["method"]]
        masked = pruner.apply(folded, group, pruner.plan(folded, group), masked=True)
        assert row["top1"] == _top1_by_hand(MODEL, masked, test_set), row
    # the row-averaged map changes the merged weights, so the function
    exact = pruners["intra_fusion_row_average"]
    reference = ifjax.intra_fusion(0.5)
    a = exact.apply(folded, group, exact.plan(folded, group), masked=True)
    b = reference.apply(folded, group, reference.plan(folded, group), masked=True)
    assert not np.allclose(a["params"]["conv0"]["kernel"], b["params"]["conv0"]["kernel"])
    with pytest.raises(ValueError, match="unknown method 'sinkhorn'"):
        sweep.datafree_sweep(
            MODEL, variables, batches, example_input=EXAMPLE, methods=("sinkhorn",)
        )


def test_an_interrupted_sweep_resumes_from_its_journal(base, tmp_path, monkeypatch):
    variables, _, batches = base
    kwargs = dict(example_input=EXAMPLE, sparsities=(0.25, 0.5), progress=False)
    kwargs |= dict(importances=("l1", "random"), seed=7)
    uninterrupted = sweep.datafree_sweep(MODEL, variables, batches, **kwargs)
    journal = tmp_path / "sweep.jsonl"
    original = training.evaluate
    calls = []
    interrupt = [True]

    def interrupted_after_five(*args, **options):
        calls.append(1)
        if interrupt[0] and len(calls) == 1 + 5 + 1:  # the base model and five cells ran
            raise KeyboardInterrupt
        return original(*args, **options)

    monkeypatch.setattr(training, "evaluate", interrupted_after_five)
    with pytest.raises(KeyboardInterrupt):
        sweep.datafree_sweep(MODEL, variables, batches, journal=journal, **kwargs)
    assert len(journal.read_text().splitlines()) == 5
    with open(journal, "a") as file:
        file.write('{"settings": {"solver"')  # a line cut short by the interruption
    calls.clear()
    interrupt[0] = False
    resumed = sweep.datafree_sweep(MODEL, variables, batches, journal=journal, **kwargs)
    assert len(calls) == 1 + len(uninterrupted) - 5  # only the missing cells ran
    assert resumed == uninterrupted
    with pytest.raises(ValueError, match="differing: seed"):
        sweep.datafree_sweep(MODEL, variables, batches, journal=journal, **kwargs | {"seed": 8})
    journal.write_text("not json\n" + journal.read_text())
    with pytest.raises(ValueError, match="line 1 is corrupt"):
        sweep.datafree_sweep(MODEL, variables, batches, journal=journal, **kwargs)


def test_a_sweep_stops_when_told_and_resumes_from_that_cell(base, tmp_path):
    """``stop_when`` (a time limit, say) ends a sweep between cells; its journal resumes."""
    variables, _, batches = base
    kwargs = dict(example_input=EXAMPLE, sparsities=(0.25, 0.5), progress=False)
    journal = tmp_path / "sweep.jsonl"
    asked = []

    def after_three() -> bool:
        asked.append(1)
        return len(asked) > 3

    first = sweep.datafree_sweep(
        MODEL, variables, batches, journal=journal, stop_when=after_three, **kwargs
    )
    assert len(first) == 3 == len(journal.read_text().splitlines())
    whole = sweep.datafree_sweep(MODEL, variables, batches, journal=journal, **kwargs)
    assert whole[:3] == first and len(whole) > 3
    assert whole == sweep.datafree_sweep(MODEL, variables, batches, **kwargs)
    # a finished sweep does not ask
    asked.clear()
    again = sweep.datafree_sweep(
        MODEL, variables, batches, journal=journal, stop_when=after_three, **kwargs
    )
    assert again == whole and asked == []


def test_paper_lamp_scores_lamp_as_the_released_code(base):
    variables, _, batches = base
    kwargs = dict(example_input=EXAMPLE, groups=[0], sparsities=(0.5,), progress=False)
    kwargs |= dict(importances=("lamp",), methods=("default",))
    released = sweep.datafree_sweep(MODEL, variables, batches, paper_lamp=True, **kwargs)
    correct = sweep.datafree_sweep(MODEL, variables, batches, paper_lamp=False, **kwargs)
    assert [r["scoring"] for r in released] == ["lamp_released"]
    assert [r["scoring"] for r in correct] == ["lamp"]
    assert released[0]["importance"] == correct[0]["importance"] == "lamp"


def test_sweep_rejects_bad_requests(base):
    variables, _, batches = base
    sweep_ = lambda **kw: sweep.datafree_sweep(
        MODEL, variables, batches, example_input=EXAMPLE, progress=False, **kw
    )
    with pytest.raises(ValueError, match="unknown group 5: the model has groups 0..1"):
        sweep_(groups=[0, 5])
    with pytest.raises(ValueError, match=r"sparsity 1.0 is outside \[0, 1\)"):
        sweep_(sparsities=(1.0,))
    with pytest.raises(ValueError, match="taylor' needs gradients"):
        sweep_(importances=("taylor",))
    with pytest.raises(ValueError, match="unknown importance 'l3'"):
        sweep_(importances=("l3",))
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        sweep_(methods=("magic",))


def _row(group, sparsity, importance, method, top1, scoring=None):
    return dict(
        model="vgg11_bn",
        dataset="cifar10",
        group=group,
        sparsity=sparsity,
        importance=importance,
        method=method,
        top1=top1,
        base_top1=80.0,
        scoring=scoring or importance,
        converged=True,
    )


SYNTHETIC = [
    _row(0, 0.5, "l1", "default", 70.0),
    _row(0, 0.5, "l1", "intra_fusion", 75.0),
    _row(0, 0.7, "l1", "default", 60.0),
    _row(0, 0.7, "l1", "intra_fusion", 55.5),
    _row(1, 0.5, "lamp", "default", 50.0, "lamp"),
    _row(1, 0.5, "lamp", "intra_fusion", 52.0, "lamp"),
    _row(2, 0.5, "lamp", "default", 40.0, "lamp_released"),
    _row(2, 0.5, "lamp", "intra_fusion", 41.0, "lamp_released"),
]
PAPER = {
    (0, 0.5, "l1"): (87.91, 89.07),
    (0, 0.7, "l1"): (86.78, 89.29),
    (1, 0.5, "lamp"): (80.0, 81.0),
    (2, 0.5, "lamp"): (80.0, 79.0),
}


def test_paper_columns_gains_and_sign_agreement():
    rows = sweep.add_paper_columns(SYNTHETIC, PAPER)
    by_cell = {(r["group"], r["sparsity"], r["method"]): r for r in rows}
    first = by_cell[(0, 0.5, "default")]
    assert first["gain"] == 5.0 and first["paper_gain"] == pytest.approx(1.16)
    assert (first["paper_default"], first["paper_intra_fusion"]) == (87.91, 89.07)
    assert first["sign_agrees"] is True
    assert by_cell[(0, 0.7, "intra_fusion")]["gain"] == -4.5
    assert by_cell[(0, 0.7, "intra_fusion")]["sign_agrees"] is False
    # Correct LAMP is not what the paper measured: no comparison.
    assert by_cell[(1, 0.5, "default")]["paper_gain"] == ""
    assert by_cell[(1, 0.5, "default")]["sign_agrees"] == ""
    # lamp_released is the paper's "lamp": +1 here, -1 there.
    assert by_cell[(2, 0.5, "default")]["paper_gain"] == -1.0
    assert by_cell[(2, 0.5, "default")]["sign_agrees"] is False
    assert sweep.sign_agreement(rows) == (1, 3)
    assert "paper_gain" not in sweep.add_paper_columns(SYNTHETIC, None)[0]


def test_markdown_table_has_the_papers_layout():
    table = sweep.markdown_table(sweep.add_paper_columns(SYNTHETIC, PAPER), title="t")
    lines = table.splitlines()
    assert lines[0] == "## t"
    assert "Base model top-1 (BatchNorm folded): 80.00%" in table
    header = next(line for line in lines if line.startswith("| group"))
    assert header == "| group | importance |  | 50% | 70% |"
    assert "| 0 | l1 | Default | 70.00 | 60.00 |" in lines
    assert "| 0 | l1 | Intra-Fusion | 75.00 | 55.50 |" in lines
    assert "| 0 | l1 | gain | +5.00 | -4.50 |" in lines
    assert "| 0 | l1 | paper gain | +1.16 ✓ | +2.51 ✗ |" in lines
    assert "| 1 | lamp | gain | +2.00 |  |" in lines
    assert not any(line.startswith("| 1 | lamp | paper gain") for line in lines)
    assert lines[-1] == "Gain sign agrees with the paper in 1 of 3 cells."


def test_csv_and_plots_are_written(tmp_path):
    rows = sweep.add_paper_columns(SYNTHETIC, PAPER)
    path = sweep.write_csv(rows, tmp_path / "out" / "datafree.csv")
    with open(path) as file:
        read = list(csv.DictReader(file))
    assert tuple(read[0]) == sweep.CSV_COLUMNS + sweep.PAPER_COLUMNS
    assert len(read) == len(rows)
    assert (
        read[1]["top1"] == "75.0" and read[1]["gain"] == "5.0" and read[1]["sign_agrees"] == "True"
    )
    for plot in (sweep.plot_datafree, sweep.plot_gains):
        png = plot(rows, tmp_path / f"{plot.__name__}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000


def test_paper_numbers_are_read_from_the_shared_csv(monkeypatch):
    require_shared("paper")
    table = paper.paper_datafree("vgg11_bn", "cifar10_jpeg")
    assert table[(0, 0.5, "l1")] == (87.91, 89.07)
    assert table[(0, 0.1, "taylor")] == (89.47, 89.46)
    assert len(table) == 8 * 7 * 3
    assert paper.paper_datafree("resnet50", "imagenet2012") is None  # not a CIFAR table
    assert paper.paper_datafree("vgg11_bn", "svhn") is None
    monkeypatch.setenv("IFJAX_PAPER_DIR", "")
    assert paper.paper_dir() is None and paper.paper_datafree("vgg11_bn", "cifar10") is None


def test_papers_table_1_is_read_from_the_shared_csv(monkeypatch):
    require_shared("paper")
    table = paper.paper_finetuned("resnet18", "cifar10_jpeg")
    assert sorted(table) == [0.4, 0.6, 0.7, 0.8]
    assert table[0.7] == (92.17, 90.41, 91.37)
    assert paper.paper_finetuned("vgg11_bn", "cifar10")[0.6] == (89.56, 88.14, 88.51)
    assert paper.paper_finetuned("vgg11_bn", "svhn") is None
    monkeypatch.setenv("IFJAX_PAPER_DIR", "")
    assert paper.paper_finetuned("vgg11_bn", "cifar10") is None


def test_recalibration_reestimates_every_pruned_models_batchnorm(base, tmp_path):
    """With training batches, every cell is the physically pruned model with BatchNorm
    recalibrated on them (computed here through ifjax alone); the rows and the CSV
    record the image count, and the journal refuses a sweep without it."""
    variables, test_set, batches = base
    images = np.random.default_rng(5).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    train_set = data.ArrayDataset(images, np.zeros(40, np.int32), 10, "toy", "train")
    training_batches = list(data.batches(train_set, 16, shuffle=False, augment=False))
    kwargs = dict(example_input=EXAMPLE, sparsities=(0.5,), progress=False)
    journal = tmp_path / "sweep.jsonl"
    plain = sweep.datafree_sweep(MODEL, variables, batches, **kwargs)
    recalibrated = sweep.datafree_sweep(
        MODEL, variables, batches, recalibration_batches=training_batches, journal=journal, **kwargs
    )
    assert [r["recalibrate"] for r in plain] == [0] * 4
    assert [r["recalibrate"] for r in recalibrated] == [40] * 4
    for row in recalibrated:
        pruned_model, pruned, _ = ifjax.prune(
            MODEL,
            variables,
            row["group"],
            sparsity=0.5,
            method=row["method"],
            example_input=EXAMPLE,
        )
        pruned = ifjax.recalibrate_batchnorm(pruned_model, pruned, training_batches)
        assert row["top1"] == _top1_by_hand(pruned_model, pruned, test_set), row
    assert [r["top1"] for r in recalibrated] != [r["top1"] for r in plain]
    path = sweep.write_csv(recalibrated, tmp_path / "rows.csv")
    assert [r["recalibrate"] for r in csv.DictReader(open(path))] == ["40"] * 4
    with pytest.raises(ValueError, match="differing: recalibrate"):
        sweep.datafree_sweep(MODEL, variables, batches, journal=journal, **kwargs)
