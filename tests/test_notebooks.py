"""Every notebook runs top to bottom (on the offline CIFAR-10) and is up to date."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import require_shared

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_match_their_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make", ROOT / "notebooks" / "make_notebooks.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert sorted(make.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for name, cells in make.NOTEBOOKS.items():
        written = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        assert [c.source for c in written.cells] == [source for _, source in cells]


@pytest.mark.slow  # the notebooks train on the real CIFAR-10 zip
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    require_shared("data")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
