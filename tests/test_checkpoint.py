"""Tests for ifjax.checkpoint: dense and pruned round trips, atomicity, clear errors."""

import gc
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax.checkpoint as checkpoint
from ifjax.checkpoint import (
    FORMAT_VERSION,
    METADATA_FILE,
    restore_model,
    restore_pytree,
    save_model,
    save_pytree,
)
from models import VGG
from models.registry import build_model, model_spec

DENSE = VGG(cfg=(4, "M", 8, "M"), num_classes=3)
PRUNED = VGG(cfg=(2, "M", 5, "M"), num_classes=3)


def _variables(model, seed=0):
    """Random variables of the model's shapes (cheaper than compiling an initialiser)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def dense_variables():
    return _variables(DENSE)


@pytest.fixture
def saved(tmp_path, dense_variables):
    directory = tmp_path / "dense"
    save_model(directory, dense_variables, model_spec=model_spec(DENSE))
    return directory


def test_dense_roundtrip(tmp_path, dense_variables):
    history = [{"method": "intra_fusion", "sparsity": 0.5}]
    path = save_model(
        tmp_path / "ck",
        dense_variables,
        model_spec=model_spec(DENSE),
        history=history,
        metadata={"dataset": "cifar10"},
    )
    assert path == (tmp_path / "ck").absolute()
    variables, info = restore_model(tmp_path / "ck", expected_spec=model_spec(DENSE))
    _assert_trees_equal(variables, dense_variables)
    assert isinstance(variables["params"]["conv0"]["kernel"], jax.Array)
    assert info["model_spec"] == model_spec(DENSE)
    assert info["history"] == history
    assert info["metadata"] == {"dataset": "cifar10"}
    assert info["widths"] == {"conv0": 4, "conv1": 8, "classifier": 3}
    assert info["format_version"] == FORMAT_VERSION
    assert info["ifjax_version"]
    assert info["manifest"]["params/conv1/kernel"]["shape"] == [3, 3, 4, 8]
    assert info["manifest"]["batch_stats/bn0/mean"]["dtype"] == "float32"


def test_pruned_restores_with_its_own_shapes(tmp_path):
    pruned = _variables(PRUNED, seed=3)
    save_model(tmp_path / "pruned", pruned, model_spec=model_spec(PRUNED))
    variables, info = restore_model(tmp_path / "pruned")  # No shapes given.
    _assert_trees_equal(variables, pruned)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 2, 5)
    assert info["widths"] == {"conv0": 2, "conv1": 5, "classifier": 3}
    model = build_model(info["model_spec"])
    assert model == PRUNED
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    np.testing.assert_array_equal(model.apply(variables, x), PRUNED.apply(pruned, x))


def test_pytree_keeps_dtypes_and_empty_collections(tmp_path):
    tree = {
        "a": {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
        "n": np.arange(4, dtype=np.int64),
        "s": jnp.int32(7),
        "empty": {},
    }
    save_pytree(tmp_path / "t", tree, metadata={"note": "hi"})
    restored, info = restore_pytree(tmp_path / "t")
    assert restored["empty"] == {}
    assert restored["a"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(restored["a"]["w"], np.float32), [[0, 1, 2], [3, 4, 5]]
    )
    assert restored["n"].dtype == np.int64  # Kept as numpy: jax would narrow it.
    np.testing.assert_array_equal(restored["n"], [0, 1, 2, 3])
    assert restored["s"].dtype == jnp.int32 and int(restored["s"]) == 7
    assert info["note"] == "hi"


def test_overwrite_must_be_explicit(saved, dense_variables):
    with pytest.raises(FileExistsError, match=str(saved)):
        save_model(saved, dense_variables, model_spec=model_spec(DENSE))
    changed = jax.tree.map(lambda x: x * 2, dense_variables)
    save_model(saved, changed, model_spec=model_spec(DENSE), overwrite=True)
    _assert_trees_equal(restore_model(saved)[0], changed)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["dense"]  # No leftovers.


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, dense_variables):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an ifjax checkpoint"):
        save_model(tmp_path / "data", dense_variables, model_spec={}, overwrite=True)
    assert (tmp_path / "data" / "notes.txt").read_text() == "keep me"


def test_crash_while_saving_leaves_nothing(tmp_path, dense_variables, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "ck", dense_variables, model_spec=model_spec(DENSE))
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_and_metadata(tmp_path, saved):
    with pytest.raises(ValueError, match="does not exist"):
        restore_model(tmp_path / "nowhere")
    (saved / METADATA_FILE).unlink()
    with pytest.raises(ValueError, match=f"{METADATA_FILE} is missing"):
        restore_model(saved)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format": "other"}'])
def test_corrupt_metadata(saved, text):
    (saved / METADATA_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"corrupt checkpoint metadata {saved / METADATA_FILE}"):
        restore_model(saved)


def _edit_metadata(directory: Path, edit) -> None:
    path = directory / METADATA_FILE
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


def test_incompatible_format_version(saved):
    _edit_metadata(saved, lambda info: info.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        restore_model(saved)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("shape", [3, 3, 4, 9], "shape"),
        ("dtype", "float16", "dtype"),
        ("sha256", "0" * 64, "checksum"),
    ],
)
def test_arrays_must_match_manifest(saved, field, value, message):
    _edit_metadata(
        saved, lambda info: info["manifest"]["params/conv1/kernel"].update({field: value})
    )
    with pytest.raises(ValueError, match=f"params/conv1/kernel.*{message}"):
        restore_model(saved)


def test_manifest_must_list_every_array(saved):
    _edit_metadata(saved, lambda info: info["manifest"].pop("params/conv1/bias"))
    with pytest.raises(ValueError, match=r"unexpected \['params/conv1/bias'\]"):
        restore_model(saved)


def _array_data_files(directory: Path) -> list[Path]:
    """The data files Orbax (OCDBT) wrote: everything in a ``d/`` folder under arrays/."""
    files = [p for p in (directory / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return files


def test_truncated_array_files(saved):
    for target in _array_data_files(saved):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"corrupt checkpoint arrays in {saved}"):
        restore_model(saved)


# TensorStore reads still in flight when Orbax gives up report to a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_garbled_array_files(saved):
    rng = np.random.default_rng(0)
    for target in _array_data_files(saved):
        size = target.stat().st_size
        target.write_bytes(rng.integers(0, 256, size, np.uint8).tobytes())
    with pytest.raises(ValueError, match=f"checkpoint.*{saved}"):
        restore_model(saved)
    time.sleep(0.5)  # Let those late reports arrive inside this test, where they are ignored.
    gc.collect()


def test_changed_array_values_fail_the_checksum(saved, dense_variables):
    """Arrays rewritten by someone else (valid files, other values) are caught too."""
    changed = jax.tree.map(lambda x: x + 1, dense_variables)
    save_pytree(saved / "arrays2", changed)  # Valid Orbax files with other values.
    (saved / "arrays").rename(saved / "old")
    (saved / "arrays2" / "arrays").rename(saved / "arrays")
    with pytest.raises(ValueError, match="checksum"):
        restore_model(saved)


def test_expected_spec_mismatch(saved):
    with pytest.raises(ValueError, match="expected"):
        restore_model(saved, expected_spec=model_spec(PRUNED))


def test_reserved_metadata_keys(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_pytree(tmp_path / "t", {"w": np.ones(2)}, metadata={"manifest": {}})
