"""Orbax checkpoints of dense and pruned models, restorable without knowing the shapes.

A checkpoint is a directory::

    <directory>/
      ifjax_checkpoint.json   # written last: format version, ifjax version, model spec,
                              # widths, pruning history, user metadata, array manifest
      arrays/                 # an Orbax (StandardCheckpointHandler) checkpoint of the tree

The manifest lists every array by its ``/``-joined path with shape, dtype and SHA-256 of
its bytes, so a restore checks that Orbax gave back exactly what was saved. Saving writes
into a hidden temporary directory next to the target and renames it into place, so a
crash never leaves a directory that looks like a valid checkpoint. Saving and restoring
are local to the calling process, also under ``jax.distributed`` (where Orbax would
otherwise expect every process to take part): the caller picks the process that writes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "restore_model",
    "restore_pytree",
    "save_model",
    "save_pytree",
]

FORMAT_VERSION = 1
METADATA_FILE = "ifjax_checkpoint.json"
_ARRAYS_DIR = "arrays"
_FORMAT_NAME = "ifjax.checkpoint"
_RESERVED_KEYS = {"format", "format_version", "ifjax_version", "manifest", "empty_subtrees"}


def _ifjax_version() -> str:
    try:
        return importlib.metadata.version("ifjax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _plain_tree(tree: Any, path: tuple[str, ...] = ()) -> Any:
    """Nested mappings -> nested dicts of numpy arrays; checks keys are plain strings."""
    if isinstance(tree, Mapping):
        for key in tree:
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"checkpoint keys must be non-empty strings without '/': {key!r}")
        return {key: _plain_tree(value, (*path, key)) for key, value in tree.items()}
    if isinstance(tree, (jax.Array, np.ndarray, np.generic, int, float, bool)):
        return np.asarray(tree)
    raise TypeError(f"cannot checkpoint {type(tree).__name__} at {'/'.join(path)!r}")


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_leaves(value, f"{path}/"))
        else:
            out[path] = value
    return out


def _empty_subtrees(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_empty_subtrees(value, f"{prefix}{key}/") if value else [prefix + key])
    return out


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


def _manifest(tree: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        path: {"shape": list(x.shape), "dtype": str(x.dtype), "sha256": _digest(x)}
        for path, x in _leaves(tree).items()
    }


def _without_empty(tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            value = _without_empty(value)
            if not value:
                continue
        out[key] = value
    return out


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())


def _checkpointer() -> ocp.Checkpointer:
    """An Orbax checkpointer of the calling process alone.

    Orbax's saves and restores are collective over all JAX processes by default; these
    checkpoints hold host-local numpy trees, so with several processes
    (``jax.distributed``) each call reads or writes on its own and the caller decides
    which process writes (and synchronises the others).
    """
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(), multiprocessing_options=options)


def _move_into_place(staging: Path, directory: Path, overwrite: bool) -> None:
    """Renames ``staging`` to ``directory``; an old checkpoint there is replaced."""
    if not directory.exists():
        os.rename(staging, directory)
        return
    if not overwrite:
        raise FileExistsError(f"checkpoint directory {directory} exists; pass overwrite=True")
    if any(directory.iterdir()) and not (directory / METADATA_FILE).exists():
        raise ValueError(f"refusing to overwrite {directory}: not an ifjax checkpoint")
    retired = directory.with_name(f".{directory.name}.ifjax-old-{uuid.uuid4().hex}")
    os.rename(directory, retired)
    os.rename(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


def save_pytree(
    directory: str | os.PathLike,
    tree: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Atomically saves a nested dict of arrays with Orbax, plus a JSON manifest.

    Args:
      directory: the checkpoint directory to create.
      tree: nested mappings with string keys (no ``/``) and array leaves.
      metadata: JSON-serialisable entries stored in the metadata file (top level).
      overwrite: replace an existing checkpoint at ``directory``.

    Returns:
      The absolute checkpoint path.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.

    Example:
      >>> save_pytree("/tmp/ck", {"w": np.ones((2, 3))}, metadata={"note": "hi"})
      PosixPath('/tmp/ck')
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"checkpoint directory {directory} exists; pass overwrite=True")
    tree = _plain_tree(tree)
    info = dict(metadata or {})
    clashes = sorted(set(info) & _RESERVED_KEYS)
    if clashes:
        raise ValueError(f"metadata keys {clashes} are reserved by the checkpoint format")
    info.update(
        format=_FORMAT_NAME,
        format_version=FORMAT_VERSION,
        ifjax_version=_ifjax_version(),
        manifest=_manifest(tree),
        empty_subtrees=_empty_subtrees(tree),
    )
    json.dumps(info)  # Fail before writing anything if metadata is not serialisable.
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.ifjax-tmp-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        arrays = _without_empty(tree)
        if arrays:  # Orbax refuses an empty tree; the manifest alone describes it.
            with _checkpointer() as checkpointer:
                checkpointer.save(staging / _ARRAYS_DIR, args=ocp.args.StandardSave(arrays))
        _write_json(staging / METADATA_FILE, info)
        _move_into_place(staging, directory, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _read_info(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ValueError(f"no checkpoint at {directory}: directory does not exist")
    path = directory / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"no checkpoint at {directory}: metadata file {path} is missing")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt checkpoint metadata {path}: {error}") from error
    if not isinstance(info, dict) or info.get("format") != _FORMAT_NAME:
        raise ValueError(f"corrupt checkpoint metadata {path}: not an ifjax checkpoint")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory} has format version {info.get('format_version')!r}; "
            f"this ifjax ({_ifjax_version()}) reads version {FORMAT_VERSION}"
        )
    manifest = info.get("manifest")
    if not isinstance(manifest, dict) or not all(map(_is_entry, manifest.values())):
        raise ValueError(f"corrupt checkpoint metadata {path}: bad array manifest")
    return info


def _is_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("shape"), list)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("sha256"), str)
    )


def _check_leaves(directory: Path, leaves: dict[str, np.ndarray], manifest: dict) -> None:
    missing, extra = sorted(set(manifest) - set(leaves)), sorted(set(leaves) - set(manifest))
    if missing or extra:
        raise ValueError(
            f"checkpoint {directory}: arrays do not match the manifest "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for path, entry in manifest.items():
        array = leaves[path]
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise ValueError(
                f"checkpoint {directory}: array {path} has shape {list(array.shape)} dtype "
                f"{array.dtype}, manifest says shape {entry['shape']} dtype {entry['dtype']}"
            )
        if _digest(array) != entry["sha256"]:
            raise ValueError(f"checkpoint {directory}: array {path} is corrupt (checksum mismatch)")


def _nest(leaves: Mapping[str, Any], empty_subtrees: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in empty_subtrees:
        node = tree
        for key in path.split("/"):
            node = node.setdefault(key, {})
    for path, value in leaves.items():
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def _as_array(array: np.ndarray) -> Any:
    """A jax array when jax keeps the dtype (e.g. not int64 without x64), else numpy."""
    converted = jnp.asarray(array)
    return converted if converted.dtype == array.dtype else array


def _read_arrays(arrays_dir: Path) -> dict[str, np.ndarray]:
    if not arrays_dir.is_dir():
        raise ValueError(f"corrupt checkpoint: array directory {arrays_dir} is missing")
    try:
        with _checkpointer() as checkpointer:
            restored = checkpointer.restore(arrays_dir, args=ocp.args.StandardRestore())
        return {path: np.asarray(x) for path, x in _leaves(restored).items()}
    except Exception as error:  # Orbax and TensorStore raise many types on bad files.
        reason = str(error).split(" [tensorstore_spec=")[0][:800]  # Drop TensorStore's spec dump.
        raise ValueError(f"corrupt checkpoint arrays in {arrays_dir}: {reason}") from error


def restore_pytree(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores a :func:`save_pytree` checkpoint with the shapes it was saved with.

    Args:
      directory: the checkpoint directory.

    Returns:
      ``(tree, info)``: nested dicts of arrays in their saved dtypes (jax arrays, numpy
      where jax would change the dtype), and the metadata dict.

    Raises:
      ValueError: naming the problem, for a missing directory, missing or corrupt
        metadata, an unknown format version, or arrays that are corrupt or do not match
        the manifest.

    Example:
      >>> tree, info = restore_pytree("/tmp/ck")
      >>> tree["w"].shape, info["note"]
      ((2, 3), 'hi')
    """
    directory = Path(directory).absolute()
    info = _read_info(directory)
    leaves = _read_arrays(directory / _ARRAYS_DIR) if info["manifest"] else {}
    _check_leaves(directory, leaves, info["manifest"])
    converted = {path: _as_array(x) for path, x in leaves.items()}
    return _nest(converted, info.get("empty_subtrees", [])), info


def _widths(params: Mapping[str, Any]) -> dict[str, int]:
    """Output width (last kernel dimension) of every layer with a kernel, by layer path."""
    return {
        path.rsplit("/", 1)[0]: int(np.shape(x)[-1])
        for path, x in _leaves(params).items()
        if path.rsplit("/", 1)[-1] == "kernel" and np.ndim(x) > 0
    }


def save_model(
    directory: str | os.PathLike,
    variables: Mapping[str, Any],
    *,
    model_spec: Mapping[str, Any],
    history: list[dict[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Atomically saves a dense or pruned model's variables with its spec.

    Args:
      directory: the checkpoint directory to create.
      variables: ``{"params": ..., "batch_stats": ...}`` nested dicts of arrays.
      model_spec: JSON-serialisable description of the model (e.g.
        ``models.registry.model_spec(model)``); restored as ``info["model_spec"]``.
      history: pruning history, one JSON-serialisable dict per pruning step.
      metadata: any other JSON-serialisable information (``info["metadata"]``).
      overwrite: replace an existing checkpoint at ``directory``.

    Returns:
      The absolute checkpoint path.

    Example:
      >>> save_model("/tmp/vgg", variables, model_spec=model_spec(model),
      ...            history=[{"method": "intra_fusion", "sparsity": 0.5}])
      PosixPath('/tmp/vgg')
    """
    if "params" not in variables:
        raise ValueError(f"variables need a 'params' collection, got {sorted(variables)}")
    entries = {
        "kind": "model",
        "model_spec": model_spec,
        "widths": _widths(variables["params"]),
        "history": list(history or []),
        "metadata": dict(metadata or {}),
    }
    return save_pytree(directory, variables, metadata=entries, overwrite=overwrite)


def restore_model(
    directory: str | os.PathLike, *, expected_spec: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores a :func:`save_model` checkpoint with its own (possibly pruned) shapes.

    Args:
      directory: the checkpoint directory.
      expected_spec: if given, the stored model spec must equal it (compared as JSON).

    Returns:
      ``(variables, info)`` where ``info`` holds ``model_spec``, ``widths``, ``history``,
      ``metadata``, ``ifjax_version``, ``format_version`` and ``manifest``.

    Raises:
      ValueError: as :func:`restore_pytree`, for a checkpoint that is not a model
        checkpoint, or when the stored spec differs from ``expected_spec``.

    Example:
      >>> variables, info = restore_model("/tmp/vgg")
      >>> model = build_model(info["model_spec"])
    """
    variables, info = restore_pytree(directory)
    if info.get("kind") != "model":
        raise ValueError(f"checkpoint {directory} is not a model checkpoint")
    if expected_spec is not None:
        expected = json.loads(json.dumps(expected_spec))
        if info["model_spec"] != expected:
            raise ValueError(
                f"checkpoint {directory} holds model {info['model_spec']}, expected {expected}"
            )
    return variables, info
