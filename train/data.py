"""Data layer: CIFAR-10/100 and ImageNet through tensorflow-datasets, without TensorFlow.

Every dataset is read through ``tfds`` random-access data sources (array_record files),
which need neither TensorFlow nor apache-beam at read time.

* ``cifar10`` / ``cifar100``: tfds' datasets. A prepared copy is read as it is; a missing
  one is prepared without TensorFlow from the official python archive, downloaded into
  ``<data_dir>/downloads`` and verified (:func:`prepare_cifar`, :mod:`train.cifar`).
  ``cifar10`` takes the offline zip (``cifar10_jpeg``) before the download;
  :func:`load_dataset` lists the order.
* ``cifar10_jpeg``: the offline CIFAR-10 JPEG export (``../shared/data/cifar10-jpeg.zip``),
  registered here as the tfds builder :class:`Cifar10Jpeg`. Preparing it needs no
  TensorFlow: the original JPEG bytes are stored as they are (no re-encoding, so pixels
  are exactly what Pillow decodes from the zip) and example order is the sorted file
  names (shuffling disabled), so example ``i`` of a split is always the same image.
* ``imagenet2012``: tfds' builder (manual download), read lazily, decoded per example.

CIFAR-sized splits are materialised as numpy arrays (:class:`ArrayDataset`) and cached
in an ``.npz`` next to the prepared dataset. :func:`batches` turns a dataset into an
iterator of normalised, optionally augmented batches, deterministic in (seed, epoch, step)
and prepared by background threads.

Where datasets live: ``data_dir`` argument, else ``$IFJAX_DATA_DIR``, else
``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``. ``$IFJAX_OFFLINE=1`` forbids downloads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import io
import logging
import math
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from PIL import Image

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "IndexedDataset",
    "BatchIterator",
    "Cifar10Jpeg",  # noqa: F822 (module __getattr__: defined in train._tfds_builder)
    "Dataset",
    "DatasetUnavailableError",
    "DeviceBatches",
    "LazyImageDataset",
    "batches",
    "crop_resize",
    "default_data_dir",
    "epoch_order",
    "find_cifar10_zip",
    "load_dataset",
    "materialize",
    "normalize",
    "pack_cifar10",
    "prepare_cifar",
    "prepare_cifar10_jpeg",
    "random_crop_flip",
    "random_subset",
    "read_cifar10_zip",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)


def _tfds() -> Any:
    """tensorflow_datasets, imported on first use: reading the offline zip directly
    (:func:`read_cifar10_zip`) and everything else in this module work without it."""
    import tensorflow_datasets

    return tensorflow_datasets


def __getattr__(name: str) -> Any:
    if name == "Cifar10Jpeg":  # the tfds builder class needs tfds to be defined
        from train._tfds_builder import Cifar10Jpeg

        return Cifar10Jpeg
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_REPO_ROOT = Path(__file__).resolve().parents[1]
_ZIP_RELPATH = Path("..") / "shared" / "data" / "cifar10-jpeg.zip"
_ARRAY_RECORD = "array_record"
_CACHE_FORMAT = 1  # bump when the cache layout changes
_AUG_SALT = 0x1F7A  # non-zero: keeps augmentation seeds apart from shuffle seeds
_MATERIALIZE_CHUNK = 1000


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Returns where tfds datasets are prepared and read.

    Args:
        data_dir: explicit directory; wins over everything else.

    Returns:
        ``data_dir``, else ``$IFJAX_DATA_DIR``, else ``$TFDS_DATA_DIR``, else
        ``~/tensorflow_datasets`` (expanded, not created).
    """
    for value in (data_dir, os.environ.get("IFJAX_DATA_DIR"), os.environ.get("TFDS_DATA_DIR")):
        if value:
            return Path(value).expanduser()
    return Path("~/tensorflow_datasets").expanduser()


def _zip_candidates(zip_path: str | os.PathLike | None) -> list[Path]:
    if zip_path is not None:
        return [Path(zip_path).expanduser()]
    found = [Path(p).expanduser() for p in [os.environ.get("IFJAX_CIFAR10_ZIP")] if p]
    return found + [_REPO_ROOT / _ZIP_RELPATH, Path.cwd() / _ZIP_RELPATH]


def find_cifar10_zip(zip_path: str | os.PathLike | None = None) -> Path | None:
    """Finds the offline CIFAR-10 JPEG zip.

    Args:
        zip_path: explicit path; when given it is the only candidate.

    Returns:
        The first existing file among ``zip_path``, ``$IFJAX_CIFAR10_ZIP``,
        ``<repo>/../shared/data/cifar10-jpeg.zip`` and ``./../shared/data/cifar10-jpeg.zip``,
        or None when none exists.
    """
    for candidate in _zip_candidates(zip_path):
        if candidate.is_file():
            return candidate.resolve()
    return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# The offline CIFAR-10 JPEG builder
# --------------------------------------------------------------------------------------


def _split_members(archive: zipfile.ZipFile, split: str) -> list[tuple[str, int]]:
    """Lists ``(member name, label)`` of one split in sorted-name order.

    Raises:
        ValueError: on an unknown class folder or a split with no image.
    """
    pattern = re.compile(rf"^(?:.*/)?{split}/([^/]+)/[^/]+\.jpe?g$", re.IGNORECASE)
    members = []
    for name in sorted(archive.namelist()):
        match = pattern.match(name)
        if match is None:
            continue
        class_name = match.group(1)
        if class_name not in CIFAR10_CLASSES:
            raise ValueError(f"unknown CIFAR-10 class folder {class_name!r} in {name!r}")
        members.append((name, CIFAR10_CLASSES.index(class_name)))
    if not members:
        raise ValueError(f"no '{split}/<class>/*.jpg' image in {archive.filename}")
    return members


def _check_jpeg(data: bytes, name: str) -> None:
    """Checks (from the header only) that ``data`` is a 32x32 RGB JPEG."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG" or image.size != (32, 32) or image.mode != "RGB":
            raise ValueError(f"{name}: {image.format} {image.mode} {image.size}, not 32x32 RGB")


def prepare_cifar10_jpeg(
    data_dir: str | os.PathLike | None = None,
    zip_path: str | os.PathLike | None = None,
) -> Any:  # train._tfds_builder.Cifar10Jpeg
    """Prepares ``cifar10_jpeg`` once (a no-op when already prepared).

    tfds writes into an ``incomplete.*`` folder renamed into place at the end, so an
    interrupted preparation never looks complete; a file lock keeps two processes from
    preparing the same data_dir at once.

    Args:
        data_dir: tfds data dir (see :func:`default_data_dir`).
        zip_path: the zip (see :func:`find_cifar10_zip`).

    Returns:
        The prepared builder (``builder.as_data_source()`` reads it).
    """
    from train._tfds_builder import Cifar10Jpeg

    root = default_data_dir(data_dir)
    builder = Cifar10Jpeg(data_dir=os.fspath(root), zip_path=zip_path)
    if builder.is_prepared():
        return builder
    if find_cifar10_zip(zip_path) is None:
        tried = ", ".join(str(p) for p in _zip_candidates(zip_path))
        raise FileNotFoundError(
            f"{builder.name} is not prepared in {root} and its zip was not found (tried: {tried})"
        )
    with _file_lock(root / f".{builder.name}.lock"):
        builder = Cifar10Jpeg(data_dir=os.fspath(root), zip_path=zip_path)
        if not builder.is_prepared():
            log.info("preparing %s into %s", builder.name, builder.data_dir)
            builder.download_and_prepare(file_format=_ARRAY_RECORD)
            builder = Cifar10Jpeg(data_dir=os.fspath(root), zip_path=zip_path)
    return builder


# --------------------------------------------------------------------------------------
# The offline zip without tfds (and its packed form for machines the zip cannot go to)
# --------------------------------------------------------------------------------------

PACKED_SUFFIX = ".npz"


def _decode_jpegs(blobs: Sequence[bytes], name: str) -> np.ndarray:
    """Decodes 32x32 RGB JPEGs with Pillow (threads: the decoder releases the GIL)."""

    def decode(index: int) -> np.ndarray:
        with Image.open(io.BytesIO(blobs[index])) as image:
            array = np.asarray(image.convert("RGB"))
        if array.shape != (32, 32, 3):
            raise ValueError(f"{name}: example {index} decodes to {array.shape}, not (32, 32, 3)")
        return array

    workers = min(16, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(decode, range(len(blobs)), chunksize=512)))


def _zip_split(
    archive: zipfile.ZipFile, split: str, per_class: int | None
) -> tuple[list[bytes], np.ndarray]:
    members = _split_members(archive, split)
    if per_class is not None:
        taken = collections.Counter()
        kept = []
        for name, label in members:
            if taken[label] < per_class:
                kept.append((name, label))
                taken[label] += 1
        members = kept
    blobs = [archive.read(name) for name, _ in members]
    return blobs, np.array([label for _, label in members], np.int32)


def pack_cifar10(
    out: str | os.PathLike,
    zip_path: str | os.PathLike | None = None,
    *,
    per_class: int | None = None,
) -> Path:
    """Packs the offline zip's JPEG bytes, unchanged, into one compressed ``.npz``.

    The zip stores every JPEG on its own (63 MB); packed, the identical headers of the
    60,000 files compress away (about 18 MB), which lets the data travel where 63 MB
    does not fit (``reports/reproduce.py fullwidth --device-run``). The images decode to
    exactly the zip's pixels, in the zip's order (sorted member names).

    Args:
        out: the ``.npz`` to write (atomically).
        zip_path: the zip (see :func:`find_cifar10_zip`).
        per_class: keep only the first that many images of each class per split (tests).

    Returns:
        ``out`` as a Path.
    """
    found = find_cifar10_zip(zip_path)
    if found is None:
        tried = ", ".join(str(p) for p in _zip_candidates(zip_path))
        raise FileNotFoundError(f"CIFAR-10 JPEG zip not found (tried: {tried})")
    arrays = {}
    with zipfile.ZipFile(found) as archive:
        for split in ("train", "test"):
            blobs, labels = _zip_split(archive, split, per_class)
            arrays[f"{split}_labels"] = labels
            arrays[f"{split}_sizes"] = np.array([len(b) for b in blobs], np.int64)
            arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp.npz")
    np.savez_compressed(staging, **arrays)
    os.replace(staging, out)
    return out


def read_cifar10_zip(
    split: str, zip_path: str | os.PathLike | None = None, *, per_class: int | None = None
) -> ArrayDataset:
    """A split of the offline CIFAR-10, decoded straight from the zip (or its packed
    ``.npz``, see :func:`pack_cifar10`) with Pillow, without tfds.

    The examples are those of ``load_dataset("cifar10_jpeg", split)``, in the same order
    (sorted member names: class by class).

    Args:
        split: ``train`` or ``test``.
        zip_path: the zip or a packed ``.npz`` (default: :func:`find_cifar10_zip`).
        per_class: only the first that many images of each class (zip only).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(zip_path) if zip_path is not None else find_cifar10_zip()
    if path is None or not path.is_file():
        tried = ", ".join(str(p) for p in _zip_candidates(zip_path))
        raise FileNotFoundError(f"CIFAR-10 JPEG zip not found (tried: {tried})")
    if path.suffix == PACKED_SUFFIX:
        with np.load(path) as packed:
            if f"{split}_jpeg" not in packed:
                raise ValueError(f"{path} is not a packed CIFAR-10 (no {split}_jpeg array)")
            data, sizes = packed[f"{split}_jpeg"].tobytes(), packed[f"{split}_sizes"]
            labels = packed[f"{split}_labels"].astype(np.int32)
        ends = np.cumsum(sizes)
        if len(ends) and ends[-1] != len(data):
            raise ValueError(f"{path} is corrupt: sizes add up to {ends[-1]}, not {len(data)}")
        blobs = [data[end - size : end] for size, end in zip(sizes, ends, strict=True)]
    else:
        with zipfile.ZipFile(path) as archive:
            blobs, labels = _zip_split(archive, split, per_class)
    images = _decode_jpegs(blobs, f"{path.name}/{split}")
    return ArrayDataset(images, labels, len(CIFAR10_CLASSES), "cifar10", split, str(path))


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


class Dataset(Protocol):
    """What :func:`batches` needs: a length, a class count and batch reads."""

    num_classes: int

    def __len__(self) -> int: ...

    def get_batch(
        self, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns uint8 images (B, H, W, 3) and int32 labels (B,); augments if rng."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A split held in memory.

    Attributes:
        images: uint8 (N, H, W, C), NHWC.
        labels: int32 (N,).
        num_classes: number of classes.
        name: dataset name (e.g. ``cifar10``).
        split: split name (e.g. ``train``).
        source: where the examples came from (tfds builder, zip, cache).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str = ""
    split: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (len(self.images),) or self.labels.dtype != np.int32:
            raise ValueError(
                f"labels must be int32 ({len(self.images)},), got "
                f"{self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray, split: str | None = None) -> ArrayDataset:
        """The examples at ``indices`` (in that order) as a new dataset."""
        indices = np.asarray(indices)
        name = split if split is not None else f"{self.split}[{len(indices)} examples]"
        return dataclasses.replace(
            self, images=self.images[indices], labels=self.labels[indices], split=name
        )

    def get_batch(
        self, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gathers a batch, augmented (CIFAR pad-4 crop + flip) when ``rng`` is given.

        Args:
            indices: int (B,) example indices.
            rng: augmentation randomness; None for no augmentation.

        Returns:
            uint8 images (B, H, W, C) and int32 labels (B,).
        """
        images = self.images[indices]
        if rng is not None:
            images = random_crop_flip(images, rng)
        return images, self.labels[indices]


@dataclasses.dataclass(frozen=True, eq=False)
class IndexedDataset:
    """A view of the examples ``indices`` of any dataset (no copy); a :class:`Dataset`.

    :meth:`ArrayDataset.subset` gathers the arrays instead; :func:`random_subset` picks
    the one that fits.
    """

    base: Dataset
    indices: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, indices: np.ndarray, rng: np.random.Generator | None = None):
        """Examples ``self.indices[indices]`` of the base dataset (see ``Dataset``)."""
        return self.base.get_batch(self.indices[np.asarray(indices)], rng)


def random_subset(dataset: Dataset, size: int, *, seed: int = 0) -> Dataset:
    """``size`` examples drawn without replacement, in random order, reproducible from seed.

    The offline CIFAR-10 is stored sorted by class, so a slice such as ``train[:10%]``
    holds one class only; use this for small representative subsets. An
    :class:`ArrayDataset` gives an :class:`ArrayDataset` (:meth:`ArrayDataset.subset`),
    any other dataset an :class:`IndexedDataset` view.
    """
    if not 0 < size <= len(dataset):
        raise ValueError(f"subset size must be in [1, {len(dataset)}], got {size}")
    order = np.random.default_rng(seed).permutation(len(dataset))[:size]
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(order, split=f"{dataset.split}[random {size}, seed {seed}]")
    return IndexedDataset(dataset, order)


def _read_examples(source: Sequence[dict], keys: list[int]) -> list[dict]:
    try:
        return list(source.__getitems__(keys))  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # plain sequences; tfds.testing.mock_data sources
        return [source[k] for k in keys]


def materialize(source: Sequence[dict], *, desc: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole random-access source into arrays.

    Args:
        source: sequence of ``{"image": uint8 (H, W, C), "label": int}`` examples
            (e.g. a ``tfds.data_source`` split).
        desc: progress bar label.

    Returns:
        uint8 images (N, H, W, C) and int32 labels (N,), in source order.
    """
    n = len(source)
    images, labels = None, np.empty((n,), np.int32)
    with tqdm.tqdm(total=n, desc=f"decoding {desc}".strip(), unit="img", mininterval=1.0) as bar:
        for start in range(0, n, _MATERIALIZE_CHUNK):
            keys = list(range(start, min(start + _MATERIALIZE_CHUNK, n)))
            for k, example in zip(keys, _read_examples(source, keys), strict=True):
                image = np.asarray(example["image"], np.uint8)
                if images is None:
                    images = np.empty((n, *image.shape), np.uint8)
                images[k] = image
                labels[k] = int(example["label"])
            bar.update(len(keys))
    if images is None:
        raise ValueError(f"empty data source {desc}")
    return images, labels


def _cache_path(info: Any, split: str) -> Path | None:
    """The .npz cache path next to a prepared tfds dataset, or None if not on disk."""
    data_dir = Path(os.fspath(info.data_dir))
    if not (data_dir / "dataset_info.json").is_file():
        return None  # not a prepared dataset on a local disk (e.g. mocked)
    safe_split = re.sub(r"[^A-Za-z0-9_.-]+", "_", split)
    return data_dir / f"ifjax-cache-{safe_split}.npz"


def _fingerprint(data_dir: Path, split: str) -> str:
    """Hashes the names, sizes and mtimes of the dataset files (not caches, not hidden)."""
    digest = hashlib.sha256(f"{_CACHE_FORMAT}:{split}".encode())
    for path in sorted(data_dir.iterdir()):
        if path.is_file() and not path.name.startswith(("ifjax-cache-", ".")):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _load_cache(path: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                log.info("stale cache %s (dataset files changed), rebuilding", path)
                return None
            return cached["images"], cached["labels"]
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError) as error:
        log.warning("unreadable cache %s (%s), rebuilding", path, error)
        return None


def _save_cache(path: Path, fingerprint: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the cache atomically (temporary file + rename); failures only warn."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, images=images, labels=labels, fingerprint=np.array(fingerprint))
        os.replace(tmp, path)
    except OSError as error:
        log.warning("could not write cache %s: %s", path, error)
        tmp.unlink(missing_ok=True)


def _array_dataset_from_source(source: Any, name: str, origin: str) -> ArrayDataset:
    """Materialises a tfds data source, through the .npz cache when possible."""
    info, split = source.dataset_info, str(source.split)
    num_classes = int(info.features["label"].num_classes)
    path = _cache_path(info, split)
    fingerprint = _fingerprint(path.parent, split) if path is not None else ""
    arrays = _load_cache(path, fingerprint) if path is not None else None
    if arrays is not None:
        log.info("%s/%s: loaded from cache %s", name, split, path)
        return ArrayDataset(*arrays, num_classes, name, split, f"{origin} (cache {path})")
    images, labels = materialize(source, desc=f"{info.full_name}/{split}")
    if path is not None:
        _save_cache(path, fingerprint, images, labels)
    return ArrayDataset(images, labels, num_classes, name, split, origin)


def _open_image(image: Any) -> Image.Image:
    """A lazily decoded Pillow image from encoded bytes or a uint8 (H, W, C) array."""
    if isinstance(image, bytes | bytearray | np.bytes_):
        return Image.open(io.BytesIO(bytes(image)))
    return Image.fromarray(np.asarray(image, np.uint8))


def _center_box(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
    """A centred square box whose side is ``fraction`` of the shorter side."""
    side = max(1, round(min(width, height) * fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _random_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Inception-style random crop: area 8-100%, aspect ratio 3/4-4/3 (10 tries)."""
    for _ in range(10):
        area = width * height * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, left + crop_w, top + crop_h
    return _center_box(width, height, 1.0)


def crop_resize(
    image: Any, size: int, rng: np.random.Generator | None = None, crop_fraction: float = 0.875
) -> np.ndarray:
    """ImageNet-style crop + resize of one image.

    Eval (``rng`` None): the centred square of ``crop_fraction`` of the shorter side
    (resize-256/crop-224 for the defaults), resized to ``size``. Train: a random
    Inception-style crop resized to ``size``, mirrored with probability 1/2. JPEGs are
    decoded at a reduced scale (Pillow ``draft``) when the crop is much larger than
    ``size``.

    Args:
        image: encoded image bytes or uint8 (H, W, C) array.
        size: output side.
        rng: augmentation randomness; None for the deterministic eval transform.
        crop_fraction: eval crop side over the shorter side.

    Returns:
        uint8 (size, size, 3).
    """
    pil = _open_image(image)
    width, height = pil.size
    box = (
        _random_box(width, height, rng)
        if rng is not None
        else _center_box(width, height, crop_fraction)
    )
    reduce = min(box[2] - box[0], box[3] - box[1]) / size
    if pil.format == "JPEG" and reduce >= 2:
        pil.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
    sx, sy = pil.size[0] / width, pil.size[1] / height
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    out = pil.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=scaled)
    array = np.asarray(out, np.uint8)
    if rng is not None and rng.random() < 0.5:
        array = array[:, ::-1]
    return array


class LazyImageDataset:
    """Random access to a large split, decoding and resizing each example on read.

    Attributes:
        num_classes: number of classes.
        image_size: side of the square output images.
        name, split, source: as in :class:`ArrayDataset`.
    """

    def __init__(
        self,
        examples: Sequence[dict],
        *,
        num_classes: int,
        image_size: int = 224,
        name: str = "",
        split: str = "",
        source: str = "",
    ):
        """Wraps ``examples``: ``{"image": bytes or uint8 (H, W, 3), "label": int}``."""
        self._examples = examples
        self.num_classes, self.image_size = num_classes, image_size
        self.name, self.split, self.source = name, split, source

    def __len__(self) -> int:
        return len(self._examples)

    def get_batch(
        self, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reads and transforms a batch (see :func:`crop_resize`).

        Args:
            indices: int (B,) example indices.
            rng: augmentation randomness; None for the eval transform.

        Returns:
            uint8 images (B, image_size, image_size, 3) and int32 labels (B,).
        """
        examples = _read_examples(self._examples, [int(i) for i in indices])
        images = np.stack([crop_resize(ex["image"], self.image_size, rng) for ex in examples])
        labels = np.array([int(ex["label"]) for ex in examples], np.int32)
        return images, labels


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither prepared locally nor preparable here."""


_TFDS_DATASETS = ("cifar10", "cifar100", "imagenet2012")
_IMAGENET_HINT = (
    " imagenet2012 needs a manual download: put ILSVRC2012_img_train.tar and"
    " ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/."
)


def _open_prepared(name: str, split: str, root: Path, decoders: Any = None) -> tuple[Any, str]:
    """A prepared tfds array_record data source and "", or None and why it is not there."""
    try:
        source = _tfds().data_source(
            name,
            split=split,
            data_dir=os.fspath(root),
            download=False,
            decoders=decoders,
            builder_kwargs={"file_format": _ARRAY_RECORD},
        )
    except Exception as error:  # tfds raises KeyError, ValueError, ... when not prepared
        log.debug("tfds.data_source(%r) in %s: %r", name, root, error)
        return None, f"{name} is not prepared as array_record in {root}"
    return source, ""


def _tfds_origin(source: Any) -> str:
    return f"tfds {source.dataset_info.full_name} ({source.dataset_info.data_dir})"


def _imagenet_source(split: str, root: Path, download: bool) -> Any:
    """Opens imagenet2012 (images left encoded), preparing it with tfds if allowed.

    Raises:
        DatasetUnavailableError: not prepared and not preparable (no TF, no manual files).
    """
    decoders = {"image": _tfds().decode.SkipDecoding()}
    source, missing = _open_prepared("imagenet2012", split, root, decoders)
    if source is not None:
        return source
    if not download:
        raise DatasetUnavailableError(f"{missing}. download=False.{_IMAGENET_HINT}")
    if importlib.util.find_spec("tensorflow") is None:
        raise DatasetUnavailableError(
            f"{missing}. tfds needs TensorFlow to prepare imagenet2012 and it is not"
            " installed: install tensorflow, or prepare it elsewhere with"
            " tfds.data_source('imagenet2012', builder_kwargs={'file_format': 'array_record'})"
            f" and copy imagenet2012/ into {root}.{_IMAGENET_HINT}"
        )
    try:
        return _tfds().data_source(
            "imagenet2012",
            split=split,
            data_dir=os.fspath(root),
            decoders=decoders,
            builder_kwargs={"file_format": _ARRAY_RECORD},
        )
    except Exception as error:
        raise DatasetUnavailableError(
            f"{missing}. Preparing it with tfds failed: {error!r}.{_IMAGENET_HINT}"
        ) from error


def _offline_reason(download: bool) -> str | None:
    """Why the network must not be used, or None when it may be."""
    if not download:
        return "download=False"
    if os.environ.get("IFJAX_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "$IFJAX_OFFLINE is set"
    return None


def prepare_cifar(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Any:
    """Prepares tfds' ``cifar10`` or ``cifar100`` from its official archive, without TF.

    The archive is taken from ``<data_dir>/downloads`` when it is there, else downloaded
    there (not when ``download`` is False or ``$IFJAX_OFFLINE`` is set); its checksums
    are verified before it is converted (see :mod:`train.cifar`). A file lock keeps two
    processes from preparing the same data_dir at once; a no-op when prepared.

    Args:
        name: ``cifar10`` or ``cifar100``.
        data_dir: tfds data dir (see :func:`default_data_dir`).
        download: allow the download.

    Returns:
        The prepared builder (``builder.as_data_source(split)`` reads it).

    Raises:
        train.cifar.ArchiveError: no archive and no download, or a failed, wrong or
            corrupt archive; nothing is left prepared.
    """
    from train import cifar  # needs tfds

    root = default_data_dir(data_dir)
    offline = _offline_reason(download)
    with _file_lock(root / f".{name}.lock"):
        try:
            return cifar.prepare(cifar.ARCHIVES[name], root, download_missing=offline is None)
        except cifar.DownloadError as error:
            if offline is None:
                raise
            raise cifar.DownloadError(f"{error} ({offline})") from error


def _unavailable_message(name: str, root: Path, tried: list[str]) -> str:
    """One message: the sources tried, in order, and how to get the dataset."""
    from train import cifar

    archive = cifar.ARCHIVES[name]
    remedies = [
        f"run again with internet access (it downloads {archive.url},"
        f" {archive.size / 2**20:.0f} MiB, into {root / 'downloads'})",
        f"or put {archive.filename} there yourself",
    ]
    if name == "cifar10":
        remedies.append("or pass --zip-path (or set $IFJAX_CIFAR10_ZIP) to cifar10-jpeg.zip")
    return (
        f"{name} is not available here. Tried: {'; '.join(tried)}."
        f" To get it: {', '.join(remedies)}."
    )


def _load_cifar(
    name: str, split: str, root: Path, zip_path: str | os.PathLike | None, download: bool
) -> ArrayDataset:
    """``cifar10`` or ``cifar100`` from the first source that has it (see load_dataset)."""
    from train import cifar

    source, missing = _open_prepared(name, split, root)
    if source is not None:
        log.info("%s/%s: %s", name, split, _tfds_origin(source))
        return _array_dataset_from_source(source, name, _tfds_origin(source))
    tried = [f"(1) a prepared copy: {missing}"]
    if name == "cifar10":
        from train._tfds_builder import Cifar10Jpeg

        if Cifar10Jpeg(data_dir=os.fspath(root)).is_prepared() or find_cifar10_zip(zip_path):
            return _load_cifar10_jpeg(split, root, zip_path, name)
        looked = ", ".join(dict.fromkeys(str(p.resolve()) for p in _zip_candidates(zip_path)))
        tried.append(f"(2) the offline CIFAR-10 zip: not found (looked at {looked})")
    try:
        builder = prepare_cifar(name, root, download=download)
    except cifar.ArchiveError as error:
        tried.append(f"({len(tried) + 1}) the official archive: {error}")
        raise DatasetUnavailableError(_unavailable_message(name, root, tried)) from error
    source = builder.as_data_source(split=split)
    origin = f"{_tfds_origin(source)}, prepared from {cifar.ARCHIVES[name].url}"
    log.info("%s/%s: %s", name, split, origin)
    return _array_dataset_from_source(source, name, origin)


def _load_cifar10_jpeg(
    split: str, data_dir: str | os.PathLike | None, zip_path: str | os.PathLike | None, name: str
) -> ArrayDataset:
    builder = prepare_cifar10_jpeg(data_dir, zip_path)
    source = builder.as_data_source(split=split)
    log.info("%s/%s: offline CIFAR-10 JPEG export in %s", name, split, builder.data_dir)
    origin = f"cifar10_jpeg ({builder.data_dir}), the offline CIFAR-10 JPEG export"
    return _array_dataset_from_source(source, name, origin)


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    zip_path: str | os.PathLike | None = None,
    download: bool = True,
    image_size: int = 224,
) -> ArrayDataset | LazyImageDataset:
    """Loads a split of ``cifar10``, ``cifar10_jpeg``, ``cifar100`` or ``imagenet2012``.

    CIFAR splits come back in memory (cached as .npz next to the prepared dataset);
    ImageNet comes back lazy. ``cifar10`` and ``cifar100`` come from the first of:

    1. a prepared copy (tfds array_record) in the data dir;
    2. ``cifar10`` only: the offline JPEG export, ``cifar10_jpeg``, prepared already or
       now from its zip (``zip_path``, ``$IFJAX_CIFAR10_ZIP``, ``../shared/data``);
    3. the official archive, downloaded (short connect timeout), verified and converted
       by :func:`prepare_cifar`, read through tfds from then on.

    The log and the dataset's ``source`` say which; when none works the error says
    what was tried and how to get the dataset.

    Args:
        name: dataset name.
        split: tfds split, e.g. ``train``, ``test``, ``validation``, ``train[:10%]``.
        data_dir: tfds data dir (see :func:`default_data_dir`).
        zip_path: CIFAR-10 JPEG zip (see :func:`find_cifar10_zip`).
        download: allow downloads (CIFAR archives; tfds' preparation of ImageNet).
        image_size: output side of ImageNet images.

    Returns:
        :class:`ArrayDataset` (CIFAR) or :class:`LazyImageDataset` (ImageNet).

    Raises:
        ValueError: unknown name.
        DatasetUnavailableError: the dataset cannot be had here.
    """
    if name == "cifar10_jpeg":
        return _load_cifar10_jpeg(split, data_dir, zip_path, name)
    if name not in _TFDS_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; one of cifar10_jpeg, {_TFDS_DATASETS}")
    root = default_data_dir(data_dir)
    if name != "imagenet2012":
        return _load_cifar(name, split, root, zip_path, download)
    source = _imagenet_source(split, root, download)
    origin = _tfds_origin(source)
    log.info("%s/%s: %s", name, split, origin)
    num_classes = int(source.dataset_info.features["label"].num_classes)
    return LazyImageDataset(
        source,
        num_classes=num_classes,
        image_size=image_size,
        name=name,
        split=split,
        source=origin,
    )


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] -> (x - ImageNet mean) / ImageNet std, per channel.

    Args:
        images: uint8 (..., 3).

    Returns:
        float32, same shape.
    """
    scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
    shift = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
    out = images.astype(np.float32)
    out *= scale
    out -= shift
    return out


def random_crop_flip(
    images: np.ndarray, rng: np.random.Generator, *, padding: int = 4, flip_prob: float = 0.5
) -> np.ndarray:
    """CIFAR augmentation: zero-pad, random crop back to size, random horizontal flip.

    One gather for the whole batch: offsets in [0, 2 * padding] per example, columns
    reversed for the flipped ones.

    Args:
        images: uint8 (B, H, W, C).
        rng: randomness (draws B row offsets, B column offsets, B flip coins in order).
        padding: zero padding on each side.
        flip_prob: probability of mirroring an example.

    Returns:
        uint8 (B, H, W, C).
    """
    batch, height, width, _ = images.shape
    rows0 = rng.integers(0, 2 * padding + 1, size=batch)
    cols0 = rng.integers(0, 2 * padding + 1, size=batch)
    flip = rng.random(batch) < flip_prob
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    padded = np.pad(images, pad) if padding else images
    rows = rows0[:, None] + np.arange(height)  # (B, H)
    col_steps = np.where(flip[:, None], np.arange(width)[::-1], np.arange(width))
    cols = cols0[:, None] + col_steps  # (B, W)
    return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    """Number of batches in one epoch.

    Args:
        num_examples: examples in the dataset.
        batch_size: examples per batch.
        drop_remainder: whether the last partial batch is dropped.

    Returns:
        ``num_examples // batch_size`` if ``drop_remainder`` else the ceiling.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def epoch_order(num_examples: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Example order of one epoch: ``default_rng((seed, epoch)).permutation`` or identity.

    Returns:
        int64 (num_examples,) permutation.
    """
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


class BatchIterator:
    """Iterator over one epoch of batches ``{"image": float32 (B, H, W, C), "label": int32 (B,)}``.

    Batch ``step`` depends only on (dataset, seed, epoch, step): the order comes from
    :func:`epoch_order` and the augmentation from ``default_rng((seed, epoch, salt, step))``,
    so starting at ``start_step`` yields exactly the tail of a full epoch. Batches are
    prepared by ``num_threads`` background threads, at most ``prefetch`` ahead of the
    consumer. ``len()`` is the number of batches still to come.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        epoch: int = 0,
        drop_remainder: bool = False,
        start_step: int = 0,
        num_threads: int = 2,
        prefetch: int = 4,
    ):
        """See :func:`batches`."""
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size, drop_remainder)
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} not in [0, {self.steps_per_epoch}]")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
        self._dataset, self._batch_size = dataset, batch_size
        self._augment, self._seed, self._epoch = augment, seed, epoch
        self._order = epoch_order(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch)
        self._next_step = self._submitted = start_step
        self._prefetch, self._closed = max(1, prefetch), False
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="ifjax-data")
            if num_threads > 0
            else None
        )

    def make_batch(self, step: int) -> dict[str, np.ndarray]:
        """Builds batch ``step`` of this epoch (thread-safe, no iterator state)."""
        indices = self._order[step * self._batch_size : (step + 1) * self._batch_size]
        rng = None
        if self._augment:
            rng = np.random.default_rng((self._seed, self._epoch, _AUG_SALT, step))
        images, labels = self._dataset.get_batch(indices, rng)
        return {"image": normalize(images), "label": np.asarray(labels, np.int32)}

    def __len__(self) -> int:
        return 0 if self._closed else self.steps_per_epoch - self._next_step

    def __iter__(self) -> BatchIterator:
        return self

    def _fill(self) -> None:
        while self._submitted < self.steps_per_epoch and len(self._pending) < self._prefetch:
            self._pending.append(self._pool.submit(self.make_batch, self._submitted))
            self._submitted += 1

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed or self._next_step >= self.steps_per_epoch:
            self.close()
            raise StopIteration
        if self._pool is None:
            batch = self.make_batch(self._next_step)
        else:
            self._fill()
            future = self._pending.popleft()
            self._fill()
            try:
                batch = future.result()
            except BaseException:
                self.close()
                raise
        self._next_step += 1
        return batch

    def close(self) -> None:
        """Stops the background threads; pending batches are dropped, iteration ends."""
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_pool"):  # __init__ may have raised before creating it
            self.close()


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    augment: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    start_step: int = 0,
    num_threads: int = 2,
    prefetch: int = 4,
) -> BatchIterator:
    """One epoch of normalised batches, prepared in background threads.

    Args:
        dataset: :class:`ArrayDataset`, :class:`LazyImageDataset` or any :class:`Dataset`.
        batch_size: examples per batch.
        shuffle: shuffle with ``default_rng((seed, epoch))``.
        augment: train augmentation (CIFAR: pad-4 crop + flip; ImageNet: random crop + flip).
        seed: non-negative seed.
        epoch: non-negative epoch number (changes order and augmentation).
        drop_remainder: drop the last partial batch.
        start_step: first batch to yield (resume mid-epoch); batches are identical to
            those of a full epoch from step 0.
        num_threads: background worker threads; 0 prepares batches in the caller.
        prefetch: batches prepared ahead of the consumer.

    Returns:
        :class:`BatchIterator` of ``{"image": float32 (B, H, W, C), "label": int32 (B,)}``;
        ``len()`` gives the batches left.
    """
    return BatchIterator(
        dataset,
        batch_size,
        shuffle=shuffle,
        augment=augment,
        seed=seed,
        epoch=epoch,
        drop_remainder=drop_remainder,
        start_step=start_step,
        num_threads=num_threads,
        prefetch=prefetch,
    )


# --------------------------------------------------------------------------------------
# Batches made on the accelerator
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("augment", "padding"))
def _device_batch(
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    key: jax.Array,
    *,
    augment: bool,
    padding: int = 4,
) -> dict[str, jax.Array]:
    """Gathers a batch on the device; pad-4 crop + flip (as :func:`random_crop_flip`) and
    :func:`normalize`."""
    x = images[indices]
    batch, height, width, _ = x.shape
    if augment:
        row_key, col_key, flip_key = jax.random.split(key, 3)
        rows0 = jax.random.randint(row_key, (batch,), 0, 2 * padding + 1)
        cols0 = jax.random.randint(col_key, (batch,), 0, 2 * padding + 1)
        flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
        padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        rows = rows0[:, None] + jnp.arange(height)
        cols = cols0[:, None] + jnp.where(flip[:, None], jnp.arange(width)[::-1], jnp.arange(width))
        x = padded[jnp.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]
    scale = jnp.asarray(1.0 / (255.0 * IMAGENET_STD), jnp.float32)
    shift = jnp.asarray(IMAGENET_MEAN / IMAGENET_STD, jnp.float32)
    return {"image": x.astype(jnp.float32) * scale - shift, "label": labels[indices]}


class DeviceBatches:
    """Training epochs whose batches are gathered and augmented on the accelerator.

    The uint8 split is put on the device once (CIFAR-10: 150 MB); each step is one jitted
    gather + pad-4 crop + flip + normalisation, so the host only sends indices. The order
    of an epoch is :func:`epoch_order` (as :func:`batches`); the augmentation is drawn
    from ``fold_in(key(seed), epoch, step)``, so a batch depends only on (seed, epoch,
    step) and an epoch resumed at ``start_step`` continues exactly. Use as the
    ``train_batches`` of :func:`train.training.fit`.

    Example:
      >>> loader = DeviceBatches(train_set, batch_size=512, seed=0)
      >>> fit(model, variables, train_batches=loader, steps_per_epoch=loader.steps_per_epoch, ...)
    """

    def __init__(
        self, dataset: ArrayDataset, batch_size: int, *, seed: int = 0, augment: bool = True
    ):
        if not 0 < batch_size <= len(dataset):
            raise ValueError(f"batch_size must be in [1, {len(dataset)}], got {batch_size}")
        self.images = jax.device_put(dataset.images)
        self.labels = jax.device_put(dataset.labels)
        self.num_examples, self.batch_size = len(dataset), batch_size
        self.seed, self.augment = seed, augment
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size, drop_remainder=True)

    def __call__(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
        order = epoch_order(self.num_examples, shuffle=True, seed=self.seed, epoch=epoch)
        order = jnp.asarray(order[: self.steps_per_epoch * self.batch_size], jnp.int32)
        order = order.reshape(self.steps_per_epoch, self.batch_size)
        key = jax.random.fold_in(jax.random.key(self.seed ^ _AUG_SALT), epoch)
        for step in range(start_step, self.steps_per_epoch):
            yield _device_batch(
                self.images,
                self.labels,
                order[step],
                jax.random.fold_in(key, step),
                augment=self.augment,
            )
