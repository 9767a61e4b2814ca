"""Tests of train/cifar.py and the order of CIFAR sources in train/data.py, offline.

The archives are small ones built here in the official format (pickled batches and meta
files in a .tar.gz) and served from 127.0.0.1 or a file URL; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import shutil
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train import cifar, data

OFFICIAL = dict(cifar.ARCHIVES)
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail


@dataclasses.dataclass(frozen=True)
class FakeArchive:
    """A small archive in the official format and what it holds."""

    path: Path
    images: dict[str, np.ndarray]  # split -> uint8 (N, 32, 32, 3)
    labels: dict[str, dict[str, np.ndarray]]  # split -> feature -> (N,)
    names: dict[str, list[str]]  # feature -> class names

    def spec(self, url: str | None = None) -> cifar.CifarArchive:
        """The archive's CifarArchive: the official layout with this file's digests."""
        payload = self.path.read_bytes()
        dataset = "cifar10" if "cifar-10-" in self.path.name else "cifar100"
        return dataclasses.replace(
            OFFICIAL[dataset],
            url=url or self.path.as_uri(),
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            md5=hashlib.md5(payload).hexdigest(),
        )


def _python2_style(batch: dict) -> bytes:
    """Pickled as the official files are: ndarrays rebuilt by numpy.core.multiarray."""
    payload = pickle.dumps(batch, protocol=2)
    return payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _write_tar_gz(path: Path, folder: str, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _make_archive(
    path: Path, spec: cifar.CifarArchive, sizes: dict[str, int], classes: dict[str, int]
) -> FakeArchive:
    """Random batches of ``sizes[split]`` images per split, labels below ``classes``."""
    rng = np.random.default_rng(len(classes))
    members, images, labels = {}, {}, {}
    for split, batch_names in spec.split_members.items():
        parts = []
        for index, name in enumerate(batch_names):
            pixels = rng.integers(0, 256, (sizes[split], 3 * 32 * 32), dtype=np.uint8)
            batch = {b"batch_label": b"fake", b"data": pixels}
            for feature, key in spec.label_keys.items():
                batch[key.encode()] = rng.integers(0, classes[feature], sizes[split]).tolist()
            first = index == 0
            members[name] = _python2_style(batch) if first else pickle.dumps(batch, protocol=4)
            parts.append(batch)
        stacked = np.concatenate([b[b"data"] for b in parts])
        images[split] = stacked.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels[split] = {
            feature: np.concatenate([b[key.encode()] for b in parts])
            for feature, key in spec.label_keys.items()
        }
    names = {f: [f"{f}{i}" for i in range(classes[f])] for f in spec.name_keys}
    meta = {spec.name_keys[f].encode(): [n.encode() for n in names[f]] for f in names}
    members[spec.meta_member] = pickle.dumps(meta, protocol=2)
    _write_tar_gz(path, spec.folder, members)
    return FakeArchive(path, images, labels, names)


@pytest.fixture(scope="module")
def cifar10_archive(tmp_path_factory: pytest.TempPathFactory) -> FakeArchive:
    """CIFAR-10 layout: five train batches of 3 images, a test batch of 4."""
    path = tmp_path_factory.mktemp("c10") / "cifar-10-python.tar.gz"
    return _make_archive(path, OFFICIAL["cifar10"], {"train": 3, "test": 4}, {"label": 10})


@pytest.fixture(scope="module")
def cifar100_archive(tmp_path_factory: pytest.TempPathFactory) -> FakeArchive:
    """CIFAR-100 layout: 7 train and 5 test images, fine and coarse labels."""
    path = tmp_path_factory.mktemp("c100") / "cifar-100-python.tar.gz"
    classes = {"label": 100, "coarse_label": 20}
    return _make_archive(path, OFFICIAL["cifar100"], {"train": 7, "test": 5}, classes)


class _ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` by path; honours Range requests when ``ranges``; each entry of
    ``cuts`` ends one response after that many bytes of the file (an interruption)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ArchiveHandler)
        self.files: dict[str, bytes] = {}
        self.cuts: list[int] = []
        self.ranges = True
        self.requests: list[tuple[str, str | None]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _ArchiveHandler(http.server.BaseHTTPRequestHandler):
    server: _ArchiveServer

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if range_header and self.server.ranges:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        stop = self.server.cuts.pop(0) if self.server.cuts else len(body)
        self.wfile.write(body[start : max(start, stop)])

    def log_message(self, *args: Any) -> None:
        del args  # quiet


@pytest.fixture
def server() -> Iterator[_ArchiveServer]:
    archive_server = _ArchiveServer()
    thread = threading.Thread(target=archive_server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield archive_server
    archive_server.shutdown()
    archive_server.server_close()


def _serve(server: _ArchiveServer, archive: FakeArchive) -> cifar.CifarArchive:
    server.files[f"/{archive.path.name}"] = archive.path.read_bytes()
    return archive.spec(server.url(archive.path.name))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/tensorflow_datasets, no offline zip, and never the real URLs."""
    monkeypatch.setenv("IFJAX_DATA_DIR", str(tmp_path / "default_data_dir"))
    monkeypatch.delenv("IFJAX_CIFAR10_ZIP", raising=False)
    monkeypatch.delenv("IFJAX_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_ZIP_RELPATH", Path("no-shared") / "cifar10-jpeg.zip")
    for name, spec in OFFICIAL.items():
        url = f"{UNREACHABLE}/{spec.filename}"
        monkeypatch.setitem(cifar.ARCHIVES, name, dataclasses.replace(spec, url=url))


def _leftovers(directory: Path) -> list[str]:
    """Files and folders under ``directory`` (relative), lock files left out."""
    if not directory.exists():
        return []
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if not p.name.endswith(".lock")
    )


# --- reading the archive --------------------------------------------------------------


def test_read_split_and_class_names(cifar10_archive: FakeArchive) -> None:
    spec = cifar10_archive.spec()
    for split, count in (("train", 15), ("test", 4)):
        images, labels = cifar.read_split(cifar10_archive.path, spec, split)
        assert images.shape == (count, 32, 32, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, cifar10_archive.images[split])
        np.testing.assert_array_equal(labels["label"], cifar10_archive.labels[split]["label"])
    # CHW rows: pixel (row 0, column 1) of channel c is data[3 * 0 + 1024 * c + 1]
    images, _ = cifar.read_split(cifar10_archive.path, spec, "test")
    raw = cifar10_archive.images["test"].transpose(0, 3, 1, 2).reshape(4, 3072)
    np.testing.assert_array_equal(images[:, 0, 1], raw[:, [1, 1025, 2049]])
    assert cifar.read_class_names(cifar10_archive.path, spec) == cifar10_archive.names


def test_read_cifar100_fine_and_coarse(cifar100_archive: FakeArchive) -> None:
    spec = cifar100_archive.spec()
    images, labels = cifar.read_split(cifar100_archive.path, spec, "train")
    np.testing.assert_array_equal(images, cifar100_archive.images["train"])
    assert set(labels) == {"label", "coarse_label"}
    for feature in labels:
        np.testing.assert_array_equal(labels[feature], cifar100_archive.labels["train"][feature])
    names = cifar.read_class_names(cifar100_archive.path, spec)
    assert len(names["label"]) == 100 and len(names["coarse_label"]) == 20


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ({"batches.meta": pickle.dumps({b"label_names": []})}, "lacks"),
        ({"test_batch": pickle.dumps(_Exploit())}, "refused to load"),
        ({"test_batch": b"not a pickle"}, "not a CIFAR batch"),
        ({"test_batch": pickle.dumps({b"data": np.zeros((2, 10), np.uint8)})}, "3072"),
        ({"test_batch": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})}, "labels"),
    ],
)
def test_malformed_archives_are_refused(tmp_path: Path, members: dict, match: str) -> None:
    path = _write_tar_gz(tmp_path / "bad.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(cifar.CorruptArchiveError, match=match):
        cifar.read_split(path, OFFICIAL["cifar10"], "test")


def test_not_a_tar_gz(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b truncated gzip")
    with pytest.raises(cifar.CorruptArchiveError, match="not a readable tar.gz"):
        cifar.read_split(path, OFFICIAL["cifar10"], "train")


# --- download -------------------------------------------------------------------------


def test_download_verifies_and_is_done_once(server, cifar10_archive, tmp_path) -> None:
    spec = _serve(server, cifar10_archive)
    path = cifar.download(spec, tmp_path / "downloads")
    assert path.read_bytes() == cifar10_archive.path.read_bytes()
    assert _leftovers(tmp_path / "downloads") == ["cifar-10-python.tar.gz"]
    assert cifar.download(spec, tmp_path / "downloads") == path
    assert len(server.requests) == 1  # the second call verified the file, no request


def test_file_url(cifar10_archive: FakeArchive, tmp_path: Path) -> None:
    path = cifar.download(cifar10_archive.spec(), tmp_path)
    assert path.read_bytes() == cifar10_archive.path.read_bytes()


@pytest.mark.parametrize("wrong", ["sha256", "md5", "size"])
def test_checksum_mismatch_keeps_nothing(server, cifar10_archive, tmp_path, wrong) -> None:
    spec = _serve(server, cifar10_archive)
    spec = dataclasses.replace(spec, **{wrong: spec.size - 1 if wrong == "size" else "0" * 8})
    with pytest.raises(cifar.ChecksumError, match="deleted|more than"):
        cifar.download(spec, tmp_path / "downloads")
    assert _leftovers(tmp_path / "downloads") == []


def test_interrupted_download_is_kept_and_resumed(server, cifar10_archive, tmp_path) -> None:
    spec = _serve(server, cifar10_archive)
    cut = spec.size // 3
    server.cuts = [cut]
    with pytest.raises(cifar.DownloadError, match="kept in .* to resume from"):
        cifar.download(spec, tmp_path, attempts=1)
    partial = tmp_path / "cifar-10-python.tar.gz.part"
    assert partial.stat().st_size == cut and not (tmp_path / "cifar-10-python.tar.gz").exists()

    path = cifar.download(spec, tmp_path)
    assert server.requests[-1][1] == f"bytes={cut}-"
    assert path.read_bytes() == cifar10_archive.path.read_bytes() and not partial.exists()


def test_interruptions_are_retried_within_a_call(server, cifar10_archive, tmp_path) -> None:
    spec = _serve(server, cifar10_archive)
    server.cuts = [spec.size // 4, spec.size // 2]
    path = cifar.download(spec, tmp_path, attempts=3)
    assert [r for _, r in server.requests] == [
        None,
        f"bytes={spec.size // 4}-",
        f"bytes={spec.size // 2}-",
    ]
    assert path.read_bytes() == cifar10_archive.path.read_bytes()


def test_restarts_when_the_server_cannot_resume(server, cifar10_archive, tmp_path) -> None:
    spec = _serve(server, cifar10_archive)
    server.ranges = False
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(b"stale bytes of another try")
    path = cifar.download(spec, tmp_path)
    assert server.requests[-1][1] == "bytes=26-"  # asked to resume, got the whole file
    assert path.read_bytes() == cifar10_archive.path.read_bytes()


def test_partial_files_complete_or_too_long(server, cifar10_archive, tmp_path) -> None:
    spec = _serve(server, cifar10_archive)
    partial = tmp_path / "cifar-10-python.tar.gz.part"
    partial.write_bytes(cifar10_archive.path.read_bytes())  # complete, not yet renamed
    assert cifar.download(spec, tmp_path).is_file() and server.requests == []
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    partial.write_bytes(b"x" * (spec.size + 1))  # longer than the archive: restarted
    assert cifar.download(spec, tmp_path).read_bytes() == cifar10_archive.path.read_bytes()
    assert server.requests == [("/cifar-10-python.tar.gz", None)]


def test_offline_fails_fast_and_leaves_nothing(cifar10_archive, tmp_path) -> None:
    spec = cifar10_archive.spec(f"{UNREACHABLE}/cifar-10-python.tar.gz")
    start = time.perf_counter()
    with pytest.raises(cifar.DownloadError, match="127.0.0.1:9"):
        cifar.download(spec, tmp_path / "downloads", attempts=3)
    assert time.perf_counter() - start < cifar.CONNECT_TIMEOUT_S
    assert _leftovers(tmp_path / "downloads") == []


def test_http_error_is_a_download_error(server, cifar10_archive, tmp_path) -> None:
    spec = cifar10_archive.spec(server.url("missing.tar.gz"))
    with pytest.raises(cifar.DownloadError, match="404"):
        cifar.download(spec, tmp_path)


# --- conversion and load_dataset ------------------------------------------------------


def _by_id(examples: list[dict], expected: np.ndarray) -> np.ndarray:
    """``expected`` reordered as the examples are (tfds shuffles; ids keep the index)."""
    return expected[[int(bytes(e["id"]).split(b"_")[-1]) for e in examples]]


def test_load_dataset_downloads_converts_and_reads(server, cifar10_archive, tmp_path, monkeypatch):
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", _serve(server, cifar10_archive))
    data_dir = tmp_path / "tfds"
    for split in ("train", "test"):
        loaded = data.load_dataset("cifar10", split, data_dir=data_dir)
        assert loaded.source.startswith("tfds cifar10/3.0.2")
        assert ("prepared from" in loaded.source) == (split == "train")  # then it is prepared
        source = tfds.data_source("cifar10", split=split, data_dir=data_dir)
        examples = [source[i] for i in range(len(source))]
        np.testing.assert_array_equal(
            loaded.images, _by_id(examples, cifar10_archive.images[split])
        )
        expected_labels = cifar10_archive.labels[split]["label"]
        np.testing.assert_array_equal(loaded.labels, _by_id(examples, expected_labels))
        assert loaded.num_classes == 10 and loaded.labels.dtype == np.int32
    assert len(server.requests) == 1  # prepared once, both splits
    info = tfds.builder("cifar10", data_dir=data_dir).info
    assert info.features["label"].names == cifar10_archive.names["label"]
    assert info.file_format.value == "array_record"
    assert not [p for p in (data_dir / "cifar10").iterdir() if "incomplete" in p.name]

    (data_dir / "downloads" / "cifar-10-python.tar.gz").unlink()  # prepared: not needed
    again = data.load_dataset("cifar10", "test", data_dir=data_dir)
    assert "prepared from" not in again.source and len(server.requests) == 1


def test_load_cifar100(server, cifar100_archive, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(cifar.ARCHIVES, "cifar100", _serve(server, cifar100_archive))
    loaded = data.load_dataset("cifar100", "train", data_dir=tmp_path)
    source = tfds.data_source("cifar100", split="train", data_dir=tmp_path)
    examples = [source[i] for i in range(len(source))]
    assert loaded.num_classes == 100 and len(loaded) == 7
    np.testing.assert_array_equal(loaded.images, _by_id(examples, cifar100_archive.images["train"]))
    for feature in ("label", "coarse_label"):
        expected = _by_id(examples, cifar100_archive.labels["train"][feature])
        np.testing.assert_array_equal([e[feature] for e in examples], expected)
    np.testing.assert_array_equal(loaded.labels, [e["label"] for e in examples])


def test_corrupt_archive_prepares_nothing(tmp_path: Path, monkeypatch) -> None:
    members = {"batches.meta": pickle.dumps({b"label_names": [b"%d" % i for i in range(10)]})}
    bad = FakeArchive(
        _write_tar_gz(tmp_path / "src" / "cifar-10-python.tar.gz", "cifar-10-batches-py", members),
        {},
        {},
        {},
    )
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", bad.spec())
    with pytest.raises(cifar.CorruptArchiveError, match="lacks"):
        data.prepare_cifar("cifar10", tmp_path / "tfds")
    assert _leftovers(tmp_path / "tfds" / "cifar10") == []
    assert not cifar.Cifar10Archive(data_dir=tmp_path / "tfds").is_prepared()


def _tiny_zip(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="JPEG")
    with zipfile.ZipFile(path, "w") as archive:
        for split in ("train", "test"):
            archive.writestr(f"cifar10/{split}/cat/0000.jpg", buffer.getvalue())
    return path


def test_zip_comes_before_the_download(server, cifar10_archive, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", _serve(server, cifar10_archive))
    zip_path = _tiny_zip(tmp_path / "cifar10-jpeg.zip")
    loaded = data.load_dataset("cifar10", "train", data_dir=tmp_path / "a", zip_path=zip_path)
    assert loaded.source.startswith("cifar10_jpeg") and server.requests == []
    monkeypatch.setenv("IFJAX_CIFAR10_ZIP", str(zip_path))
    assert data.load_dataset("cifar10", "test", data_dir=tmp_path / "b").source.startswith(
        "cifar10_jpeg"
    )
    assert server.requests == []


def test_prepared_copy_comes_first(server, cifar10_archive, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", _serve(server, cifar10_archive))
    data.prepare_cifar("cifar10", tmp_path)
    zip_path = _tiny_zip(tmp_path / "cifar10-jpeg.zip")
    loaded = data.load_dataset("cifar10", "test", data_dir=tmp_path, zip_path=zip_path)
    assert loaded.source.startswith("tfds cifar10/3.0.2") and len(loaded) == 4


def test_archive_put_by_hand_is_used_offline(cifar10_archive, tmp_path, monkeypatch) -> None:
    spec = cifar10_archive.spec(f"{UNREACHABLE}/cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", spec)
    monkeypatch.setenv("IFJAX_OFFLINE", "1")
    (tmp_path / "downloads").mkdir()
    shutil.copy(cifar10_archive.path, tmp_path / "downloads" / spec.filename)
    loaded = data.load_dataset("cifar10", "test", data_dir=tmp_path)
    assert sorted(loaded.labels) == sorted(cifar10_archive.labels["test"]["label"])


def test_wrong_archive_put_by_hand_is_named_not_deleted(cifar10_archive, tmp_path, monkeypatch):
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", cifar10_archive.spec())
    wrong = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    wrong.parent.mkdir()
    wrong.write_bytes(b"x" * 10)
    with pytest.raises(data.DatasetUnavailableError, match="has 10 bytes"):
        data.load_dataset("cifar10", "train", data_dir=tmp_path)
    assert wrong.read_bytes() == b"x" * 10


def test_unavailable_message_lists_every_source(tmp_path, monkeypatch) -> None:
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError) as raised:
        data.load_dataset("cifar10", "train", data_dir=tmp_path)
    message = str(raised.value)
    assert time.perf_counter() - start < cifar.CONNECT_TIMEOUT_S
    for part in ("(1) a prepared copy: cifar10 is not prepared", "(2) the offline CIFAR-10 zip",
                 f"(3) the official archive: downloading {UNREACHABLE}", "To get it:",
                 "--zip-path", str(tmp_path / "downloads")):  # fmt: skip
        assert part in message, part
    assert _leftovers(tmp_path) == []

    monkeypatch.setenv("IFJAX_OFFLINE", "1")
    with pytest.raises(data.DatasetUnavailableError) as raised:
        data.load_dataset("cifar100", "test", data_dir=tmp_path)
    message = str(raised.value)
    assert "(2) the official archive: cifar-100-python.tar.gz is not in" in message
    assert "$IFJAX_OFFLINE is set" in message and "--zip-path" not in message
    with pytest.raises(data.DatasetUnavailableError, match="download=False"):
        data.load_dataset("cifar100", "test", data_dir=tmp_path, download=False)
