"""Tests of train/data.py: the offline CIFAR-10 builder, loading, caching, batching."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train import data

REAL_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.zip"
HAS_TF = importlib.util.find_spec("tensorflow") is not None

# Tiny zip: 2 classes x 3 images per split. "cat" (label 3) checks that labels come from
# the folder name, not the folder's rank. Colours are solid, so JPEG keeps them within +-3.
CLASSES = ("airplane", "cat")
COLOURS = {
    ("train", "airplane"): [(250, 10, 10), (10, 250, 10), (10, 10, 250)],
    ("train", "cat"): [(200, 200, 20), (20, 200, 200), (128, 128, 128)],
    ("test", "airplane"): [(60, 120, 180), (180, 120, 60), (30, 30, 30)],
    ("test", "cat"): [(240, 240, 240), (90, 30, 150), (150, 90, 30)],
}


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=100)
    return buffer.getvalue()


def expected(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Expected colours (N, 3) and labels (N,) in sorted-file-name order."""
    colours, labels = [], []
    for name in CLASSES:
        colours += COLOURS[(split, name)]
        labels += [data.CIFAR10_CLASSES.index(name)] * 3
    return np.array(colours), np.array(labels)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch ~/tensorflow_datasets or a user-set zip from a test."""
    monkeypatch.setenv("IFJAX_DATA_DIR", str(tmp_path / "default_data_dir"))
    monkeypatch.delenv("IFJAX_CIFAR10_ZIP", raising=False)


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zip") / "cifar10-jpeg.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("cifar10/README.txt", "not an image")
        # Written in reverse order: the builder must sort the names itself.
        for (split, name), colours in reversed(COLOURS.items()):
            for i in reversed(range(len(colours))):
                archive.writestr(f"cifar10/{split}/{name}/{i:04d}.jpg", _jpeg(colours[i]))
    return path


@pytest.fixture(scope="module")
def prepared(tiny_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding cifar10_jpeg prepared from the tiny zip."""
    data_dir = tmp_path_factory.mktemp("tfds")
    data.prepare_cifar10_jpeg(data_dir, tiny_zip)
    return data_dir


def array_dataset(n: int = 10, value: int | None = None, size: int = 8) -> data.ArrayDataset:
    """Images whose pixels encode (example, row, column) unless ``value`` is given."""
    if value is None:
        grid = np.arange(n * size * size).reshape(n, size, size, 1) % 251
        images = np.repeat(grid, 3, axis=-1).astype(np.uint8)
    else:
        images = np.full((n, size, size, 3), value, np.uint8)
    return data.ArrayDataset(images, np.arange(n, dtype=np.int32) % 3, 3, "toy", "train")


# --- locations ------------------------------------------------------------------------


def test_default_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert data.default_data_dir(tmp_path / "x") == tmp_path / "x"
    assert data.default_data_dir() == tmp_path / "default_data_dir"
    monkeypatch.delenv("IFJAX_DATA_DIR")
    assert data.default_data_dir() == tmp_path / "tfds"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.default_data_dir() == Path("~/tensorflow_datasets").expanduser()


def test_find_cifar10_zip(tiny_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.find_cifar10_zip(tiny_zip) == tiny_zip.resolve()
    assert data.find_cifar10_zip(tmp_path / "missing.zip") is None
    monkeypatch.setenv("IFJAX_CIFAR10_ZIP", str(tiny_zip))
    assert data.find_cifar10_zip() == tiny_zip.resolve()


# --- the builder ----------------------------------------------------------------------


def test_builder_writes_array_record_readable_without_tf(prepared: Path) -> None:
    sources = tfds.data_source("cifar10_jpeg", data_dir=prepared)
    assert {name: len(source) for name, source in sources.items()} == {"train": 6, "test": 6}
    for split in ("train", "test"):
        colours, labels = expected(split)
        for i, example in enumerate(sources[split][j] for j in range(6)):
            assert example["image"].shape == (32, 32, 3)
            assert example["image"].dtype == np.uint8
            assert example["label"] == labels[i]
            assert np.abs(example["image"].astype(int) - colours[i]).max() <= 3
    builder = tfds.builder("cifar10_jpeg", data_dir=prepared)
    assert builder.info.features["label"].names == list(data.CIFAR10_CLASSES)
    assert builder.info.file_format.value == "array_record"
    files = sorted(p.name for p in (prepared / "cifar10_jpeg" / "1.0.0").iterdir())
    assert "cifar10_jpeg-train.array_record-00000-of-00001" in files
    assert not [p for p in (prepared / "cifar10_jpeg").iterdir() if "incomplete" in p.name]
    assert "tensorflow" not in sys.modules or HAS_TF


def test_builder_order_is_sorted_file_names(prepared: Path, tiny_zip: Path) -> None:
    source = tfds.data_source("cifar10_jpeg", split="train", data_dir=prepared)
    with zipfile.ZipFile(tiny_zip) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("cifar10/train/"))
        decoded = [np.asarray(Image.open(io.BytesIO(archive.read(n)))) for n in names]
    for i, image in enumerate(decoded):  # stored bytes are the zip's: exact pixels
        np.testing.assert_array_equal(source[i]["image"], image)


def test_prepare_is_idempotent(prepared: Path, tiny_zip: Path) -> None:
    shard = prepared / "cifar10_jpeg" / "1.0.0" / "cifar10_jpeg-test.array_record-00000-of-00001"
    before = shard.stat().st_mtime_ns
    builder = data.prepare_cifar10_jpeg(prepared, tmp_missing := tiny_zip.with_name("no.zip"))
    assert not tmp_missing.exists()  # prepared already: the zip is not needed
    assert builder.is_prepared()
    assert shard.stat().st_mtime_ns == before


def test_prepare_without_zip_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        data.prepare_cifar10_jpeg(tmp_path / "dd", tmp_path / "missing.zip")
    assert not (tmp_path / "dd" / "cifar10_jpeg" / "1.0.0").exists()


def test_builder_rejects_unknown_class(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("cifar10/train/dragon/0000.jpg", _jpeg((1, 2, 3)))
        archive.writestr("cifar10/test/cat/0000.jpg", _jpeg((1, 2, 3)))
    with pytest.raises(Exception, match="dragon"):
        data.prepare_cifar10_jpeg(tmp_path / "dd", bad)
    assert not data.Cifar10Jpeg(data_dir=tmp_path / "dd").is_prepared()


# --- load_dataset ---------------------------------------------------------------------


def test_load_cifar10_jpeg_and_cache(prepared: Path, tiny_zip: Path) -> None:
    version_dir = prepared / "cifar10_jpeg" / "1.0.0"
    (version_dir / "ifjax-cache-test.npz").unlink(missing_ok=True)
    first = data.load_dataset("cifar10_jpeg", "test", data_dir=prepared)
    colours, labels = expected("test")
    assert first.images.shape == (6, 32, 32, 3) and first.images.dtype == np.uint8
    assert first.labels.dtype == np.int32 and first.num_classes == 10
    np.testing.assert_array_equal(first.labels, labels)
    assert np.abs(first.images.astype(int).mean(axis=(1, 2)) - colours).max() <= 3
    assert "cache" not in first.source
    assert (version_dir / "ifjax-cache-test.npz").is_file()
    assert not list(version_dir.glob(".*tmp*"))  # atomic write left no temporary

    second = data.load_dataset("cifar10_jpeg", "test", data_dir=prepared)
    assert "cache" in second.source
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)


def test_cache_is_invalidated_when_dataset_changes(prepared: Path) -> None:
    data.load_dataset("cifar10_jpeg", "train", data_dir=prepared)
    shard = prepared / "cifar10_jpeg" / "1.0.0" / "cifar10_jpeg-train.array_record-00000-of-00001"
    os.utime(shard, ns=(time.time_ns(), shard.stat().st_mtime_ns + 10**9))
    reloaded = data.load_dataset("cifar10_jpeg", "train", data_dir=prepared)
    assert "cache" not in reloaded.source
    assert "cache" in data.load_dataset("cifar10_jpeg", "train", data_dir=prepared).source
    np.testing.assert_array_equal(reloaded.labels, expected("train")[1])


def test_load_split_slice(prepared: Path) -> None:
    ds = data.load_dataset("cifar10_jpeg", "train[2:5]", data_dir=prepared)
    np.testing.assert_array_equal(ds.labels, expected("train")[1][2:5])


def test_load_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("mnist", "train")


def test_cifar10_falls_back_to_zip(tiny_zip: Path, tmp_path: Path) -> None:
    ds = data.load_dataset("cifar10", "train", data_dir=tmp_path / "dd", zip_path=tiny_zip)
    assert ds.name == "cifar10" and ds.source.startswith("cifar10_jpeg")
    np.testing.assert_array_equal(ds.labels, expected("train")[1])


def test_cifar10_unavailable_error(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetUnavailableError, match="cifar10 is not prepared"):
        data.load_dataset(
            "cifar10", "train", data_dir=tmp_path, zip_path=tmp_path / "no.zip", download=False
        )
    with pytest.raises(data.DatasetUnavailableError, match="manual"):
        data.load_dataset("imagenet2012", "validation", data_dir=tmp_path, download=False)


def test_cifar10_tfds_path_with_mock_data(tmp_path: Path) -> None:
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("cifar10", "train", data_dir=tmp_path)
        reference = tfds.data_source("cifar10", split="train", data_dir=tmp_path)
        examples = [reference[i] for i in range(12)]
    assert isinstance(ds, data.ArrayDataset)
    assert ds.source.startswith("tfds cifar10/3.")
    assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images, np.stack([e["image"] for e in examples]))
    np.testing.assert_array_equal(ds.labels, [e["label"] for e in examples])
    assert ds.labels.min() >= 0 and ds.labels.max() < 10


# --- preprocessing --------------------------------------------------------------------


def test_normalize_values() -> None:
    pixels = np.array([[[[0, 0, 0], [255, 255, 255], [128, 64, 32]]]], np.uint8)
    out = data.normalize(pixels)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert out.dtype == np.float32 and out.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(out, (pixels / 255.0 - mean) / std, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], [-2.117904, -2.035714, -1.804444], atol=1e-6)


def test_flip_is_exact_mirror_and_identity() -> None:
    images = array_dataset(5).images
    rng = np.random.default_rng(0)
    mirrored = data.random_crop_flip(images, rng, padding=0, flip_prob=1.0)
    np.testing.assert_array_equal(mirrored, images[:, :, ::-1])
    same = data.random_crop_flip(images, rng, padding=0, flip_prob=0.0)
    np.testing.assert_array_equal(same, images)


def test_crop_matches_reference_loop() -> None:
    images = array_dataset(16).images
    out = data.random_crop_flip(images, np.random.default_rng(3), padding=4)
    rng = np.random.default_rng(3)  # same draws, in the documented order
    rows, cols, flips = rng.integers(0, 9, 16), rng.integers(0, 9, 16), rng.random(16) < 0.5
    assert out.shape == images.shape and out.dtype == np.uint8
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 1
    for i in range(16):
        crop = np.pad(images[i], ((4, 4), (4, 4), (0, 0)))[rows[i] : rows[i] + 8, cols[i] :][:, :8]
        np.testing.assert_array_equal(out[i], crop[:, ::-1] if flips[i] else crop)


def test_padding_is_normalized_zero() -> None:
    batch = next(iter(data.batches(array_dataset(64, value=255), 64, shuffle=False, augment=True)))
    image = batch["image"]
    zero = (0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
    full = (1 - data.IMAGENET_MEAN) / data.IMAGENET_STD
    is_zero = np.isclose(image, zero, atol=1e-6).all(-1)
    assert (is_zero | np.isclose(image, full, atol=1e-6).all(-1)).all()
    assert 0 < is_zero.mean() < 0.5  # some examples were shifted by up to 4 pixels
    assert not is_zero[:, 4:-4, 4:-4].any()  # the centre always stays inside the image


# --- batches --------------------------------------------------------------------------


def collect(dataset: data.Dataset, **kwargs) -> list[dict[str, np.ndarray]]:
    return list(data.batches(dataset, kwargs.pop("batch_size", 4), **kwargs))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_types_and_unshuffled_order() -> None:
    ds = array_dataset(10)
    out = collect(ds, shuffle=False, augment=False)
    assert [b["image"].shape for b in out] == [(4, 8, 8, 3)] * 2 + [(2, 8, 8, 3)]
    assert all(b["image"].dtype == np.float32 and b["label"].dtype == np.int32 for b in out)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in out]), ds.labels)
    np.testing.assert_allclose(out[0]["image"], data.normalize(ds.images[:4]))


def test_batches_deterministic_in_seed_and_epoch() -> None:
    ds = array_dataset(40)
    kwargs = dict(shuffle=True, augment=True, seed=7, batch_size=8)
    a, b = collect(ds, epoch=1, **kwargs), collect(ds, epoch=1, **kwargs, num_threads=0)
    assert_same(a, b)
    c = collect(ds, epoch=2, **kwargs)
    order = lambda bs: np.concatenate([x["image"][:, 4, 4, 0] for x in bs])  # noqa: E731
    assert not np.array_equal(order(a), order(c))
    assert not np.array_equal(order(a), order(collect(ds, epoch=1, **{**kwargs, "seed": 8})))
    unaugmented = collect(ds, epoch=1, shuffle=True, seed=7, batch_size=8, augment=False)
    seen = np.sort(np.concatenate([x["label"] for x in unaugmented]))
    np.testing.assert_array_equal(seen, np.sort(ds.labels))  # each example exactly once
    perm = np.random.default_rng((7, 1)).permutation(40)
    np.testing.assert_allclose(unaugmented[0]["image"], data.normalize(ds.images[perm[:8]]))


def test_start_step_resumes_exactly() -> None:
    ds = array_dataset(30)
    kwargs = dict(shuffle=True, augment=True, seed=1, epoch=3, batch_size=4)
    full = collect(ds, **kwargs)
    iterator = data.batches(
        ds, 4, **{k: v for k, v in kwargs.items() if k != "batch_size"}, start_step=5
    )
    assert len(iterator) == len(full) - 5 == 3
    tail = list(iterator)
    assert_same(tail, full[5:])
    assert len(iterator) == 0
    assert collect(ds, **kwargs, start_step=8) == []
    with pytest.raises(ValueError, match="start_step"):
        data.batches(ds, 4, shuffle=False, augment=False, start_step=9)


def test_drop_remainder_and_steps_per_epoch() -> None:
    ds = array_dataset(10)
    dropped = collect(ds, shuffle=True, augment=False, drop_remainder=True)
    assert [len(b["label"]) for b in dropped] == [4, 4]
    assert data.steps_per_epoch(10, 4, drop_remainder=True) == 2
    assert data.steps_per_epoch(10, 4, drop_remainder=False) == 3
    assert data.steps_per_epoch(8, 4, drop_remainder=False) == 2
    assert len(data.batches(ds, 4, shuffle=False, augment=False)) == 3
    with pytest.raises(ValueError, match="batch_size"):
        data.steps_per_epoch(10, 0, drop_remainder=False)


def test_early_close_stops_workers() -> None:
    before = set(threading.enumerate())
    with data.batches(array_dataset(400), 4, shuffle=True, augment=True, prefetch=3) as it:
        next(it)
        workers = [t for t in threading.enumerate() if t not in before]
        assert workers and all(t.name.startswith("ifjax-data") for t in workers)
    assert len(it) == 0
    with pytest.raises(StopIteration):
        next(it)
    for worker in workers:
        worker.join(timeout=5)
        assert not worker.is_alive(), "worker thread did not stop"


def test_worker_errors_propagate() -> None:
    class Broken(data.ArrayDataset):
        def get_batch(self, indices, rng=None):
            raise RuntimeError("decode failed")

    ds = array_dataset(8)
    broken = Broken(ds.images, ds.labels, 3)
    with pytest.raises(RuntimeError, match="decode failed"):
        collect(broken, shuffle=False, augment=False)


# --- ImageNet-style lazy dataset ------------------------------------------------------


def test_center_crop_resize() -> None:
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :20] = (255, 0, 0)
    image[:, 20:60] = (0, 255, 0)
    image[:, 60:] = (0, 0, 255)
    out = data.crop_resize(image, 8, crop_fraction=1.0)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    # Inside: exactly the green centre; the outermost columns get a little of the
    # neighbours through the bilinear filter's support (Pillow samples beyond the box).
    np.testing.assert_array_equal(out[:, 1:-1], np.broadcast_to([0, 255, 0], (8, 6, 3)))
    assert (out[..., 1] >= 200).all() and (out[..., [0, 2]] <= 40).all()


def test_lazy_dataset_decodes_and_augments() -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    examples = [{"image": _jpeg(c, (300, 200)), "label": i} for i, c in enumerate(colours)]
    ds = data.LazyImageDataset(examples, num_classes=3, image_size=16)
    images, labels = ds.get_batch(np.array([2, 0]))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.array([2, 0], np.int32))
    assert np.abs(images.astype(int).mean(axis=(1, 2)) - [colours[2], colours[0]]).max() <= 3
    gradient = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (100, 1, 3))
    grad_ds = data.LazyImageDataset(
        [{"image": gradient, "label": 0}] * 4, num_classes=1, image_size=16
    )
    a = grad_ds.get_batch(np.arange(4), np.random.default_rng(0))[0]
    b = grad_ds.get_batch(np.arange(4), np.random.default_rng(0))[0]
    c = grad_ds.get_batch(np.arange(4), np.random.default_rng(1))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    batch = next(iter(data.batches(grad_ds, 4, shuffle=True, augment=True)))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32


def test_lazy_dataset_over_tfds_source_with_skip_decoding(prepared: Path) -> None:
    """The imagenet2012 wiring (encoded bytes from a tfds data source), on cifar10_jpeg."""
    source = tfds.data_source(
        "cifar10_jpeg",
        split="test",
        data_dir=prepared,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    assert isinstance(source[0]["image"], bytes)
    ds = data.LazyImageDataset(source, num_classes=10, image_size=24)
    images, labels = ds.get_batch(np.arange(6)[::-1])
    colours, expected_labels = expected("test")
    assert images.shape == (6, 24, 24, 3)
    np.testing.assert_array_equal(labels, expected_labels[::-1])
    assert np.abs(images.astype(int).mean(axis=(1, 2)) - colours[::-1]).max() <= 3


# --- the real zip (slow) --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ZIP.is_file(), reason="no ../shared/data/cifar10-jpeg.zip")
def test_real_cifar10_zip(tmp_path: Path) -> None:
    for split, n in (("train", 5000), ("test", 1000)):
        ds = data.load_dataset("cifar10_jpeg", split, data_dir=tmp_path, zip_path=REAL_ZIP)
        assert ds.images.shape == (10 * n, 32, 32, 3)
        np.testing.assert_array_equal(np.bincount(ds.labels), [n] * 10)
        start = time.perf_counter()
        cached = data.load_dataset("cifar10_jpeg", split, data_dir=tmp_path)
        assert time.perf_counter() - start < 5 and "cache" in cached.source
        np.testing.assert_array_equal(cached.images, ds.images)


def test_random_subset_is_reproducible_and_mixed():
    images = np.repeat(np.arange(10, dtype=np.uint8), 20)[:, None, None, None] * np.ones(
        (1, 2, 2, 3), np.uint8
    )
    labels = np.repeat(np.arange(10, dtype=np.int32), 20)  # sorted by class, like the zip
    dataset = data.ArrayDataset(images, labels, 10, "toy", "train")
    a = data.random_subset(dataset, 50, seed=1)
    b = data.random_subset(dataset, 50, seed=1)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a) == 50 and len(set(a.labels.tolist())) >= 8
    np.testing.assert_array_equal(a.images[:, 0, 0, 0], a.labels)  # images follow labels
    assert not np.array_equal(a.labels, data.random_subset(dataset, 50, seed=2).labels)
    with pytest.raises(ValueError, match="subset size"):
        data.random_subset(dataset, 0)
