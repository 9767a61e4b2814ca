"""reports/mobilenet.py end to end on a tiny MobileNetV2: every table holds measured numbers."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mobilenet_report(tmp_path, monkeypatch):
    require_shared("data")
    monkeypatch.syspath_prepend(str(ROOT / "reports"))
    spec = importlib.util.spec_from_file_location(
        "mobilenet_report", ROOT / "reports" / "mobilenet.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reproduce = sys.modules["reproduce"]
    tiny = dict(reproduce.SETTINGS[module.MODEL], epochs=1, train_subset=256, test_subset=100)
    monkeypatch.setitem(reproduce.SETTINGS, module.MODEL, tiny)
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "REPORTS", tmp_path / "reports")
    monkeypatch.setattr(module, "GROUPS", [0, 1, 2])  # the head, then a block's expansion
    monkeypatch.setattr(module, "THROUGHPUT_BATCH", 16)
    monkeypatch.setattr(module, "SPARSITIES", (0.5,))
    monkeypatch.setattr(module, "IMPORTANCES", ("l1",))
    monkeypatch.setattr(module, "ROUNDING_MODELS", (module.MODEL,))
    monkeypatch.setattr(module, "ROUNDING_SPARSITIES", (0.3,))
    return module, reproduce


@pytest.mark.slow  # trains on the real CIFAR-10 zip
def test_mobilenet_report_end_to_end(mobilenet_report):
    module, reproduce = mobilenet_report
    text = module.report().read_text()
    for heading in ("## Data-free: one group at a time", "## round_to=8: accuracy and throughput"):
        assert heading in text
    with open(reproduce.REPORTS / "data" / "mobilenetv2_datafree.csv") as file:
        rows = list(csv.DictReader(file))
    assert {r["coupling"] for r in rows} == {"depthwise-coupled", "pointwise"}
    assert {r["method"] for r in rows} == {"default", "intra_fusion"}
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)
    with open(reproduce.REPORTS / "data" / "round_to.csv") as file:
        rounded = list(csv.DictReader(file))
    assert sorted((r["round_to"], r["method"]) for r in rounded) == [
        ("1", "default"), ("1", "intra_fusion"), ("8", "default"), ("8", "intra_fusion"),
    ]  # fmt: skip
    for r in rounded:
        kept = [int(k) for k in r["kept"].split()]
        assert kept and int(r["multiples_of_8"]) == sum(k % 8 == 0 for k in kept)
        assert r["round_to"] == "1" or int(r["multiples_of_8"]) == len(kept)
    assert (reproduce.REPORTS / "figures" / "mobilenetv2_datafree.png").stat().st_size > 10_000
    assert "x |" in text.split("## round_to=8")[1]  # the throughput ratio column
