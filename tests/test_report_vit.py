"""reports/vit.py end to end on a tiny ViT: every table of the report holds measured numbers."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def vit_report(tmp_path, monkeypatch):
    require_shared("data")
    monkeypatch.syspath_prepend(str(ROOT / "reports"))
    spec = importlib.util.spec_from_file_location("vit_report", ROOT / "reports" / "vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reproduce = sys.modules["reproduce"]
    tiny = dict(reproduce.SETTINGS["vit"], width=0.5, epochs=1, train_subset=256, test_subset=100)
    monkeypatch.setitem(reproduce.SETTINGS, "vit", tiny)
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "REPORTS", tmp_path / "reports")
    monkeypatch.setattr(module, "SPARSITIES", (0.3, 0.5))
    monkeypatch.setattr(module, "IMPORTANCES", ("l1", "taylor"))
    return module, reproduce


@pytest.mark.slow  # trains on the real CIFAR-10 zip
def test_vit_report_end_to_end(vit_report):
    module, reproduce = vit_report
    path = module.vit_report()
    text = path.read_text()
    for heading in ("## One layer at a time", "### All head groups", "## How heads merge",
                    "## All MLP and head groups at 50%", "## Findings"):  # fmt: skip
        assert heading in text
    with open(reproduce.REPORTS / "data" / "datafree_vit.csv") as file:
        rows = list(csv.DictReader(file))
    # 4 MLP + 4 head groups x 2 sparsities x 2 importances x 2 methods
    assert len(rows) == 8 * 2 * 2 * 2
    assert {r["kind"] for r in rows} == {"neurons", "heads"}
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)
    with open(reproduce.REPORTS / "data" / "finetuned_vit.csv") as file:
        tuned = list(csv.DictReader(file))
    assert [r["method"] for r in tuned] == ["default", "intra_fusion"]
    assert (reproduce.REPORTS / "figures" / "datafree_vit.png").stat().st_size > 10_000
    # a second run resumes from the journals: the same tables
    again = module.vit_report().read_text()
    assert (
        again.split("## One layer")[1].split("## The pruned")[0]
        == text.split("## One layer")[1].split("## The pruned")[0]
    )
