"""The one real-data test CI runs (cheap): the real CIFAR-10 zip in ../shared is found by
default, holds the full dataset, and its JPEGs load through train.data.

Every other test that reads the real zip (reports, notebooks, the demo, the full
preparation of both splits) is marked ``slow``: deselected by default, run with
``pytest -m slow``.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import require_shared
from train import data


def test_real_zip_is_found_complete_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = require_shared("data")
    monkeypatch.delenv("IFJAX_CIFAR10_ZIP", raising=False)
    assert data.find_cifar10_zip() == real.resolve()  # found without being named
    with zipfile.ZipFile(real) as archive:
        names = [n for n in archive.namelist() if n.endswith(".jpg")]
        counts = Counter(tuple(n.split("/")[1:3]) for n in names)
        for split, per_class in (("train", 5000), ("test", 1000)):
            assert {c: counts[split, c] for c in data.CIFAR10_CLASSES} == dict.fromkeys(
                data.CIFAR10_CLASSES, per_class
            )
        assert len(names) == 60_000
        # a sample of real images (3 per class of the test split) through the data layer
        firsts = ("0000.jpg", "0001.jpg", "0002.jpg")
        sample = sorted(n for n in names if n.split("/")[1] == "test" and n[-8:] in firsts)
        small = tmp_path / "sample.zip"
        with zipfile.ZipFile(small, "w") as out:
            for name in sample:
                out.writestr(name, archive.read(name))
                out.writestr(name.replace("/test/", "/train/"), archive.read(name))
        decoded = [np.asarray(Image.open(io.BytesIO(archive.read(n)))) for n in sample]
    assert len(sample) == 30
    test = data.load_dataset("cifar10_jpeg", "test", data_dir=tmp_path / "tfds", zip_path=small)
    assert test.images.shape == (30, 32, 32, 3) and test.images.dtype == np.uint8
    expected = [data.CIFAR10_CLASSES.index(n.split("/")[2]) for n in sample]
    np.testing.assert_array_equal(test.labels, expected)
    np.testing.assert_array_equal(test.images, np.stack(decoded))
    assert 60 < test.images.mean() < 190 and test.images.std() > 30  # photographs, not blanks
