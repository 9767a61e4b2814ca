"""reports/reproduce.py end to end on a tiny model: the reports it writes hold real numbers."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from tests.conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]

# trains on the real CIFAR-10 zip: deselected by default (pytest -m slow)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    """The script, set to a tiny base model shared by the tests (trained once)."""
    require_shared("data")
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "reports" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = dict(width=0.0625, epochs=1, schedule="fast", train_subset=512, test_subset=200)
    module.SETTINGS = {"vgg11_bn": tiny | dict(finetune_epochs=1, methods=module.METHODS)}
    module.RUNS = tmp_path_factory.mktemp("runs")
    return module


@pytest.fixture
def reproduce(module, tmp_path, monkeypatch):
    monkeypatch.setattr(module, "REPORTS", tmp_path / "reports")
    return module


def test_datafree_report_compares_every_cell_with_the_paper(reproduce, monkeypatch):
    monkeypatch.setattr(reproduce, "SPARSITIES", (0.3, 0.6))
    monkeypatch.setattr(reproduce, "IMPORTANCES", ("l1",))
    path = reproduce.datafree("vgg11_bn")
    text = path.read_text()
    with open(reproduce.REPORTS / "data" / "datafree_vgg11_bn.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 * 2 * len(reproduce.METHODS)  # groups x sparsities x methods
    assert {r["method"] for r in rows} == set(reproduce.METHODS)
    assert all(r["paper_gain"] != "" for r in rows)  # the paper has every one of these cells
    for label in ("Intra-Fusion (exact)", "Intra-Fusion (Sinkhorn)", "row-average"):
        assert label in text
    assert "sign agrees with paper" in text and "/16 |" in text  # 8 groups x 2 sparsities
    assert "Regenerate: `python reports/reproduce.py datafree --model vgg11_bn`" in text
    for figure in ("datafree_vgg11_bn_gains.png", "datafree_vgg11_bn_top1.png"):
        assert (reproduce.REPORTS / "figures" / figure).stat().st_size > 10_000
    # a second run resumes everything: the same report, nothing trained or swept again
    again = reproduce.datafree("vgg11_bn").read_text()
    assert again.split("## Summary")[1] == text.split("## Summary")[1]
    # random cells of the journal recomputed from scratch give the recorded accuracies
    checked = reproduce.check("vgg11_bn", cells=3)
    assert len(checked) == 3 and all(r["recomputed"] == r["top1"] for r in checked)


def test_finetuned_report_has_table_1_beside_the_paper(reproduce, monkeypatch):
    monkeypatch.setattr(reproduce, "FINETUNE_SPARSITIES", (0.4, 0.7))
    text = reproduce.finetuned("vgg11_bn").read_text()
    with open(reproduce.REPORTS / "data" / "finetuned_vgg11_bn.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["sparsity"], r["method"]) for r in rows] == [
        ("0.4", "default"),
        ("0.4", "intra_fusion"),
        ("0.7", "default"),
        ("0.7", "intra_fusion"),
    ]
    for row in rows:
        assert 0 < float(row["params"]) < float(row["dense_params"])
        assert 0 <= float(row["finetuned_top1"]) <= 100
    fewer = {r["sparsity"]: float(r["params"]) for r in rows}
    assert fewer["0.7"] < fewer["0.4"]
    assert "| 40% |" in text and "| 89.19 |" in text  # the paper's IF number at 40%
    assert "Regenerate: `python reports/reproduce.py finetuned --model vgg11_bn`" in text
