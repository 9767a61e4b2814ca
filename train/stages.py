"""Resumable pipeline stages: every finished stage's models and report row, on disk.

The split-data pipelines (:mod:`train.pipelines`) run in stages (split training, fusion,
pruning steps, fine-tuning). With a ``workdir`` they keep::

    workdir/stages/
      config.json                  # the pipeline and its settings, written first
      <pipeline>/<NN>_<stage>/     # NN: the stage's position in its pipeline, from 00
        output/                    # the finished stage: {"replica_<r>": variables} with
                                   #   the model spec and the report row (save_pytree,
                                   #   written atomically, so present means finished)
        training/                  # the stage's replica training while it runs (fit's
                                   #   layout: checkpoints/step_<N>/, metrics)

A rerun of the same pipeline with the same settings (:meth:`StageStore.open` compares
them, ignoring :data:`IGNORED_SETTINGS`) loads every finished stage instead of running
it, and a stage interrupted while training continues from its last checkpoint. Other
settings raise a ValueError naming the keys that differ, unless ``overwrite`` deletes
the old stages first. With several processes (``jax.distributed``) process 0 writes and
every process reads, so ``workdir`` must be on a file system all hosts share.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from ifjax.checkpoint import METADATA_FILE, restore_pytree, save_pytree
from models.registry import build_model, model_spec
from train.training import sync_processes

__all__ = ["CONFIG_FILE", "IGNORED_SETTINGS", "StageStore", "setting_differences"]

CONFIG_FILE = "config.json"
# Where data is read from, how replicas are laid out over devices (results equal to
# float rounding) and timing only: a run may resume with other values of these.
IGNORED_SETTINGS = ("data_dir", "devices", "num_devices", "fair_timing")
_KIND = "pipeline_stage"


def setting_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for every key whose value differs (missing: None).

    Example:
      >>> setting_differences({"k": 2, "epochs": 3}, {"k": 4, "epochs": 3})
      {'k': (2, 4)}
    """
    keys = sorted(set(old) | set(new))
    return {key: (old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)}


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(staging, path)


def _is_writer() -> bool:
    return jax.process_index() == 0


class StageStore:
    """The finished stages of one pipeline run in ``workdir/stages`` (see the module).

    Example:
      >>> store = StageStore.open("runs/fap", "fap", settings, overwrite=False)
      >>> store.load("fap", 0, "split_train")  # None until that stage has finished
    """

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def open(
        cls,
        workdir: str | os.PathLike,
        pipeline: str,
        settings: Mapping[str, Any],
        *,
        overwrite: bool = False,
    ) -> StageStore:
        """Checks (or records) the run's settings in ``workdir/stages/config.json``.

        Args:
          workdir: the pipeline's working directory.
          pipeline: ``"split_train"``, ``"fap"`` or ``"paf"``.
          settings: JSON-serialisable settings of the run; keys in
            :data:`IGNORED_SETTINGS` are not compared.
          overwrite: delete the stages of an earlier run first, whatever its settings.

        Raises:
          ValueError: ``workdir`` holds stages of a run with other settings (the message
            names every differing key), or stages without a ``config.json``.
        """
        root = Path(workdir).absolute() / "stages"
        wanted = {"pipeline": pipeline}
        wanted.update({k: v for k, v in settings.items() if k not in IGNORED_SETTINGS})
        wanted = json.loads(json.dumps(wanted, default=str))
        config = root / CONFIG_FILE
        if overwrite:
            if _is_writer() and root.exists():
                shutil.rmtree(root)
        elif config.is_file():
            _check_settings(root, json.loads(config.read_text()), wanted)
        elif root.is_dir() and any(root.iterdir()):
            raise ValueError(
                f"{root} holds stages but no {CONFIG_FILE}, so they cannot be checked; "
                "pass overwrite=True (--overwrite) to start over"
            )
        sync_processes("ifjax_stages_checked")
        if _is_writer():
            root.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(config, wanted)
        sync_processes("ifjax_stages_opened")
        return cls(root)

    def directory(self, pipeline: str, index: int, name: str) -> Path:
        """``stages/<pipeline>/<NN>_<name>``."""
        return self.root / pipeline / f"{index:02d}_{name}"

    def training_dir(self, pipeline: str, index: int, name: str) -> Path:
        """Where the stage's replica training keeps its checkpoints while it runs."""
        return self.directory(pipeline, index, name) / "training"

    def load(
        self, pipeline: str, index: int, name: str
    ) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]] | None:
        """``(model, variables_list, row)`` of a finished stage, or None if it has not finished."""
        path = self.directory(pipeline, index, name) / "output"
        if not (path / METADATA_FILE).is_file():
            return None
        tree, info = restore_pytree(path)
        if info.get("kind") != _KIND or info.get("stage") != name:
            raise ValueError(f"{path} is not the output of stage {name!r}")
        variables_list = [tree[f"replica_{r}"] for r in range(info["models"])]
        return build_model(info["model_spec"]), variables_list, info["row"]

    def save(
        self,
        pipeline: str,
        index: int,
        name: str,
        model: nn.Module,
        variables_list: Sequence[Mapping[str, Any]],
        row: Mapping[str, Any],
    ) -> None:
        """Records a finished stage (atomically) and drops its training checkpoints."""
        directory = self.directory(pipeline, index, name)
        if _is_writer():
            metadata = {
                "kind": _KIND,
                "pipeline": pipeline,
                "stage": name,
                "models": len(variables_list),
                "model_spec": model_spec(model),
                "row": dict(row),
            }
            tree = {f"replica_{r}": v for r, v in enumerate(variables_list)}
            save_pytree(directory / "output", tree, metadata=metadata, overwrite=True)
            shutil.rmtree(directory / "training", ignore_errors=True)
        sync_processes("ifjax_stage_saved")


def _check_settings(root: Path, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    stored = {k: v for k, v in stored.items() if k not in IGNORED_SETTINGS}
    differences = setting_differences(stored, wanted)
    if not differences:
        return
    changes = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in differences.items())
    raise ValueError(
        f"{root.parent} holds a {stored.get('pipeline')} run with other settings "
        f"(differing keys: {', '.join(differences)}; {changes}); pass overwrite=True "
        "(--overwrite) to delete its stages and start over, or use another workdir"
    )
