"""CIFAR-10 and CIFAR-100 from the official python archives, prepared without TensorFlow.

tfds needs TensorFlow to prepare its ``cifar10`` and ``cifar100`` (it encodes their PNGs
with it). This module does the same job without it, in three steps:

1. :func:`download` fetches the archive the dataset's authors publish into
   ``<data_dir>/downloads``, with a progress bar, resuming an interrupted download, and
   checks its size, SHA-256 and MD5 (:func:`verify`) before it is renamed into place.
2. :func:`read_split` reads the pickled batches of a split from the ``.tar.gz`` (a
   restricted unpickler: dicts, lists, bytes and numpy arrays only).
3. :class:`Cifar10Archive` / :class:`Cifar100Archive` write them as tfds' own
   ``cifar10`` / ``cifar100`` dataset (same name, version, features and example order;
   the PNGs encoded by Pillow) in array_record, so ``tfds.data_source`` reads the result
   as if tfds had prepared it. Like every tfds builder they write into an
   ``incomplete.*`` folder renamed into place at the end.

The network is used in one function, :func:`fetch`; tests point an archive's URL at a
local server (any ``http://`` or ``file://`` URL works).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import http.client
import io
import logging
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from PIL import Image

__all__ = [
    "ARCHIVES",
    "CONNECT_TIMEOUT_S",
    "ArchiveError",
    "ChecksumError",
    "Cifar100Archive",
    "Cifar10Archive",
    "CifarArchive",
    "CorruptArchiveError",
    "DownloadError",
    "convert",
    "download",
    "fetch",
    "prepare",
    "read_class_names",
    "read_split",
    "verify",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # an offline machine fails within this; also the longest read stall
_CHUNK_BYTES = 1 << 20
_IMAGE_SIDE = 32


class ArchiveError(RuntimeError):
    """An archive could not be had, or is not what it should be."""


class DownloadError(ArchiveError):
    """The download failed (no connection, HTTP error, interrupted)."""


class ChecksumError(ArchiveError):
    """A file's size or digest differs from the published one."""


class CorruptArchiveError(ArchiveError):
    """A file is not a CIFAR python archive (not a tar.gz, members missing, bad batches)."""


@dataclasses.dataclass(frozen=True)
class CifarArchive:
    """An official CIFAR python archive: where it is published and what it holds.

    Attributes:
        dataset: the tfds dataset it is prepared as (``cifar10``, ``cifar100``).
        url: where it is downloaded from.
        size: its size in bytes.
        sha256: hex SHA-256 of the whole file.
        md5: hex MD5 of the whole file (the digest the authors publish).
        folder: the folder its members are in.
        split_members: split -> its pickled batch files, in example order.
        meta_member: the pickled file holding the class names.
        label_keys: tfds label feature -> key of its labels in a batch.
        name_keys: tfds label feature -> key of its class names in the meta file.
    """

    dataset: str
    url: str
    size: int
    sha256: str
    md5: str
    folder: str
    split_members: Mapping[str, tuple[str, ...]]
    meta_member: str
    label_keys: Mapping[str, str]
    name_keys: Mapping[str, str]

    @property
    def filename(self) -> str:
        """The archive's file name (the last part of its URL)."""
        return self.url.rsplit("/", 1)[-1]


# URLs from https://www.cs.toronto.edu/~kriz/cifar.html, where the authors also publish
# the MD5s. Sizes and SHA-256s as pinned by Keras (keras/datasets/cifar10.py and
# cifar100.py, `file_hash`) and torchvision's prototype datasets (cifar.py, `_SHA256`).
# tfds 4.9.10 pins only the *binary* archives (tensorflow_datasets/url_checksums/
# cifar10.txt: cifar-10-binary.tar.gz, 170052171 bytes, sha256 c4a38c50...); the python
# archives hold the same images in the same order.
ARCHIVES: dict[str, CifarArchive] = {
    "cifar10": CifarArchive(
        dataset="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        size=170_498_071,
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        split_members={
            "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test": ("test_batch",),
        },
        meta_member="batches.meta",
        label_keys={"label": "labels"},
        name_keys={"label": "label_names"},
    ),
    "cifar100": CifarArchive(
        dataset="cifar100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        size=169_001_437,
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        split_members={"train": ("train",), "test": ("test",)},
        meta_member="meta",
        label_keys={"label": "fine_labels", "coarse_label": "coarse_labels"},
        name_keys={"label": "fine_label_names", "coarse_label": "coarse_label_names"},
    ),
}


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


def fetch(url: str, *, start: int = 0, timeout: float = CONNECT_TIMEOUT_S) -> tuple[Any, int]:
    """Opens ``url`` for reading from byte ``start``: the one function that uses the network.

    Args:
        url: an ``http(s)://`` or ``file://`` URL.
        start: the first byte wanted (asked for with a Range header when positive).
        timeout: seconds allowed to connect, and for each read.

    Returns:
        The open response and the offset of its first byte: ``start`` when the server
        honoured the range, else 0 (it sends the whole file).

    Raises:
        OSError: no connection, a timeout or an HTTP error (``urllib.error.URLError``).
    """
    headers = {"User-Agent": "ifjax"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    response = urllib.request.urlopen(request, timeout=timeout)
    content_range = response.headers.get("Content-Range") or ""
    resumed = getattr(response, "status", None) == 206 and content_range.startswith(
        f"bytes {start}-"
    )
    return response, start if resumed else 0


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _download_once(archive: CifarArchive, partial: Path, timeout: float) -> None:
    """Appends the rest of the archive to ``partial`` (restarts if the server cannot resume).

    Raises:
        ChecksumError: the server sends more bytes than the archive has.
        ConnectionError: the connection closed before the last byte.
        OSError: from :func:`fetch` or a read.
    """
    response, offset = fetch(archive.url, start=_size(partial), timeout=timeout)
    partial.parent.mkdir(parents=True, exist_ok=True)
    progress = dict(unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0)
    with (
        response,
        open(partial, "r+b" if offset else "wb") as out,
        tqdm.tqdm(total=archive.size, initial=offset, desc=archive.filename, **progress) as bar,
    ):
        out.seek(offset)
        out.truncate()
        while chunk := response.read(_CHUNK_BYTES):
            if out.tell() + len(chunk) > archive.size:
                raise ChecksumError(f"{archive.url} sends more than {archive.size} bytes")
            out.write(chunk)
            bar.update(len(chunk))
        received = out.tell()
    if received < archive.size:
        raise ConnectionError(f"connection closed after {received} of {archive.size} bytes")


def _file_digests(path: Path) -> tuple[str, str]:
    """SHA-256 and MD5 (hex) of a file, in one pass."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def verify(path: str | os.PathLike, archive: CifarArchive) -> None:
    """Checks a file's size, SHA-256 and MD5 against the archive's published values.

    Raises:
        ChecksumError: naming what differs.
    """
    path = Path(path)
    size = path.stat().st_size
    if size != archive.size:
        raise ChecksumError(f"{path} has {size} bytes, {archive.filename} has {archive.size}")
    sha256, md5 = _file_digests(path)
    if (sha256, md5) != (archive.sha256, archive.md5):
        raise ChecksumError(
            f"{path}: sha256 {sha256}, md5 {md5}; {archive.filename} has sha256"
            f" {archive.sha256}, md5 {archive.md5}"
        )


def _verify_download(partial: Path, archive: CifarArchive) -> None:
    """Verifies a finished download; a wrong one is deleted (the next try starts over)."""
    try:
        verify(partial, archive)
    except ChecksumError as error:
        partial.unlink(missing_ok=True)
        raise ChecksumError(
            f"the download of {archive.url} is corrupt ({error}); it was deleted, run again"
            " to download it anew"
        ) from error


def _failure(archive: CifarArchive, partial: Path, error: BaseException) -> str:
    """Says what failed and what is kept (an empty partial file is removed)."""
    message = f"downloading {archive.url} failed ({error!r})"
    kept = _size(partial)
    if not kept:
        partial.unlink(missing_ok=True)
        return message
    return f"{message}; {kept} of {archive.size} bytes are kept in {partial} to resume from"


def download(
    archive: CifarArchive,
    directory: str | os.PathLike,
    *,
    timeout: float = CONNECT_TIMEOUT_S,
    attempts: int = 3,
) -> Path:
    """Downloads an archive into ``directory`` once, resumably, and verifies it.

    The bytes go to ``<name>.part``, which becomes ``<name>`` only once its size and
    digests are right; a wrong one is deleted. An interrupted download is kept as
    ``<name>.part`` and continued (with an HTTP Range request; from the start when the
    server cannot resume) by the next attempt or the next call. An attempt that gets no
    byte (no connection) is not retried, so an offline machine fails within ``timeout``.

    Args:
        archive: what to download (see :data:`ARCHIVES`).
        directory: where the archive is kept (created when the first byte arrives).
        timeout: seconds to connect, and the longest stall of a read.
        attempts: tries per call while bytes keep arriving.

    Returns:
        The verified archive, ``directory / archive.filename`` (an existing one is
        verified and returned without a download).

    Raises:
        DownloadError: no connection, an HTTP error, or interrupted ``attempts`` times.
        ChecksumError: the file (downloaded or found) is not the published archive.
    """
    target = Path(directory) / archive.filename
    if target.is_file():
        try:
            verify(target, archive)
        except ChecksumError as error:
            raise ChecksumError(
                f"{error}: not the published archive; delete it (or put the official one"
                " there) and run again"
            ) from error
        return target
    partial = target.with_name(f"{target.name}.part")
    if _size(partial) > archive.size:
        partial.unlink()  # not the start of this archive
    for attempt in range(1, attempts + 1):
        before = _size(partial)
        if before == archive.size:
            break  # complete: verified below
        try:
            _download_once(archive, partial, timeout)
        except ChecksumError:
            partial.unlink(missing_ok=True)
            raise
        except (OSError, http.client.HTTPException) as error:
            kept = _size(partial)
            if attempt == attempts or kept <= before:
                raise DownloadError(_failure(archive, partial, error)) from error
            log.warning("download of %s interrupted (%s), resuming", archive.url, error)
    _verify_download(partial, archive)
    os.replace(partial, target)
    return target


# --------------------------------------------------------------------------------------
# Reading the archive
# --------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# What the batches may refer to: numpy arrays (as pickled by numpy 1 and 2) and bytes as
# Python 3 pickles them with protocol 2. Anything else is refused, not executed.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),  # numpy 1 (the archives)
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),  # numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch without executing anything but numpy array rebuilding."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None


def _unpickle(data: bytes, name: str) -> dict[str, Any]:
    """A batch or meta file as a dict with str keys (Python 2 pickles have bytes keys)."""
    try:
        loaded = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise CorruptArchiveError(f"{name} is not a CIFAR batch: {error!r}") from error
    if not isinstance(loaded, dict):
        raise CorruptArchiveError(f"{name} is a {type(loaded).__name__}, not a dict")
    return {key.decode() if isinstance(key, bytes) else key: v for key, v in loaded.items()}


def _read_members(path: Path, archive: CifarArchive, names: tuple[str, ...]) -> dict[str, bytes]:
    """The named members of the archive's folder, read in one pass over the tar.gz."""
    wanted = {f"{archive.folder}/{name}": name for name in names}
    found = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise CorruptArchiveError(f"{path} is not a readable tar.gz: {error!r}") from error
    missing = sorted(set(names) - set(found))
    if missing:
        raise CorruptArchiveError(
            f"{path} lacks {', '.join(f'{archive.folder}/{m}' for m in missing)}"
        )
    return found


def _batch_arrays(
    batch: dict[str, Any], archive: CifarArchive, name: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A batch's images, uint8 (N, 32, 32, 3), and labels per feature, int64 (N,)."""
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise CorruptArchiveError(f"{name}: 'data' is not a uint8 (N, 3072) array")
    if data.shape[1] != 3 * _IMAGE_SIDE * _IMAGE_SIDE:
        raise CorruptArchiveError(f"{name}: 'data' has shape {data.shape}, not (N, 3072)")
    images = data.reshape(-1, 3, _IMAGE_SIDE, _IMAGE_SIDE).transpose(0, 2, 3, 1)
    labels = {}
    for feature, key in archive.label_keys.items():
        values = np.asarray(batch.get(key, []), np.int64)
        if values.shape != (len(images),):
            raise CorruptArchiveError(f"{name}: {len(values)} {key!r} for {len(images)} images")
        labels[feature] = values
    return np.ascontiguousarray(images), labels


def read_split(
    path: str | os.PathLike, archive: CifarArchive, split: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reads a split of a CIFAR python archive.

    Args:
        path: the ``.tar.gz``.
        archive: its layout (see :data:`ARCHIVES`).
        split: ``train`` or ``test``.

    Returns:
        uint8 images (N, 32, 32, 3), HWC, in the archive's order, and int64 labels (N,)
        per tfds label feature (``label``; and ``coarse_label`` for CIFAR-100).

    Raises:
        CorruptArchiveError: not a tar.gz, a member missing, or a malformed batch.
    """
    names = archive.split_members[split]
    members = _read_members(Path(path), archive, names)
    parts = [_batch_arrays(_unpickle(members[n], n), archive, n) for n in names]
    images = np.concatenate([images for images, _ in parts])
    labels = {f: np.concatenate([labels[f] for _, labels in parts]) for f in archive.label_keys}
    return images, labels


def read_class_names(path: str | os.PathLike, archive: CifarArchive) -> dict[str, list[str]]:
    """The class names per tfds label feature, from the archive's meta file.

    Raises:
        CorruptArchiveError: the meta file is missing or malformed.
    """
    member = archive.meta_member
    meta = _unpickle(_read_members(Path(path), archive, (member,))[member], member)
    names = {}
    for feature, key in archive.name_keys.items():
        values = meta.get(key)
        if not isinstance(values, list):
            raise CorruptArchiveError(f"{member}: no list of class names {key!r}")
        names[feature] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return names


# --------------------------------------------------------------------------------------
# The tfds builders
# --------------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _FromArchive:
    """Prepares tfds' CIFAR dataset from a verified python archive (mixed into a builder)."""

    def __init__(
        self,
        *,
        archive_path: str | os.PathLike | None = None,
        archive: CifarArchive | None = None,
        file_format: str = "array_record",
        **kwargs: Any,
    ):
        """Creates the builder.

        Args:
            archive_path: the verified ``.tar.gz`` to prepare from (only needed to prepare).
            archive: its layout; ``ARCHIVES[name]`` if None.
            file_format: tfds file format; array_record is what data sources read.
            **kwargs: passed to the tfds builder (``data_dir``, ...).
        """
        self._archive_path = archive_path
        self._archive = archive
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file (tfds' default lookup fails under editable installs)."""
        return epath.Path(__file__)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # download() fetched and verified the archive already
        if self._archive_path is None:
            raise ValueError(f"{self.name}: no archive to prepare from (archive_path=None)")
        archive = self._archive or ARCHIVES[self.name]
        for feature, names in read_class_names(self._archive_path, archive).items():
            self.info.features[feature].names = names
        return {split: self._generate_examples(archive, split) for split in archive.split_members}

    def _generate_examples(self, archive: CifarArchive, split: str) -> Iterator[tuple[int, dict]]:
        """Examples keyed by their index, as tfds' builders key them (same order)."""
        images, labels = read_split(self._archive_path, archive, split)
        desc = f"{self.name}/{split}: converting"
        for index in tqdm.tqdm(range(len(images)), desc=desc, unit="img", mininterval=1.0):
            example = {feature: int(values[index]) for feature, values in labels.items()}
            yield index, example | {"id": f"{split}_{index:05d}", "image": _png(images[index])}


class Cifar10Archive(_FromArchive, tfds.image_classification.Cifar10, skip_registration=True):
    """tfds' ``cifar10`` prepared from ``cifar-10-python.tar.gz`` without TensorFlow."""

    name = "cifar10"


class Cifar100Archive(_FromArchive, tfds.image_classification.Cifar100, skip_registration=True):
    """tfds' ``cifar100`` prepared from ``cifar-100-python.tar.gz`` without TensorFlow."""

    name = "cifar100"


_BUILDERS = {"cifar10": Cifar10Archive, "cifar100": Cifar100Archive}


def convert(
    archive_path: str | os.PathLike, archive: CifarArchive, data_dir: str | os.PathLike
) -> tfds.core.DatasetBuilder:
    """Prepares ``archive.dataset`` in ``data_dir`` from a verified archive (once).

    Args:
        archive_path: the verified ``.tar.gz`` (see :func:`download`).
        archive: its layout.
        data_dir: the tfds data dir.

    Returns:
        The prepared builder (``builder.as_data_source(split)`` reads it).

    Raises:
        CorruptArchiveError: the archive cannot be read; nothing is left prepared.
    """
    builder_class = _BUILDERS[archive.dataset]
    kwargs = dict(archive_path=archive_path, archive=archive, data_dir=os.fspath(data_dir))
    builder = builder_class(**kwargs)
    if not builder.is_prepared():
        log.info("preparing %s from %s into %s", archive.dataset, archive_path, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
        builder = builder_class(**kwargs)
    return builder


def prepare(
    archive: CifarArchive,
    data_dir: str | os.PathLike,
    *,
    download_missing: bool = True,
    timeout: float = CONNECT_TIMEOUT_S,
) -> tfds.core.DatasetBuilder:
    """Prepares ``archive.dataset`` in ``data_dir`` once: archive, verification, conversion.

    The archive is ``<data_dir>/downloads/<filename>`` when it is there (verified; put
    it there to work offline), else it is downloaded there (:func:`download`).

    Args:
        archive: the dataset's archive (see :data:`ARCHIVES`).
        data_dir: the tfds data dir.
        download_missing: download the archive when it is not in ``<data_dir>/downloads``.
        timeout: see :func:`download`.

    Returns:
        The prepared builder; a no-op (no archive needed) when already prepared.

    Raises:
        ArchiveError: the archive is missing and not downloadable, or wrong, or corrupt.
    """
    builder = _BUILDERS[archive.dataset](archive=archive, data_dir=os.fspath(data_dir))
    if builder.is_prepared():
        return builder
    downloads = Path(data_dir) / "downloads"
    if not (downloads / archive.filename).is_file() and not download_missing:
        raise DownloadError(f"{archive.filename} is not in {downloads} and downloading is off")
    path = download(archive, downloads, timeout=timeout)
    return convert(path, archive, data_dir)
