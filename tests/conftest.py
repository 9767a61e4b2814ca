import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import VGG, resnet18

# Tests never download datasets: train.data refuses the network while this is set (the
# tests of downloads serve their archives from 127.0.0.1 and unset it).
os.environ["IFJAX_OFFLINE"] = "1"


# What tests read from ../shared (beside the project root). Without it a test is skipped,
# except under CI=true, where CI promises it: there a missing file fails the run (a CI
# without ../shared must not go green with no parity check at all).
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_FILES = {
    "golden": SHARED / "golden" / "vgg11_tiny.npz",
    "paper": SHARED / "paper",
    "data": SHARED / "data" / "cifar10-jpeg.zip",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_shared(what: str) -> Path:
    """The path of ``what`` ("golden", "paper", "data") in ../shared; skips the calling
    test when it is missing (fails it under CI=true). Depends on files only."""
    path = SHARED_FILES[what]
    if not path.exists():
        message = f"../shared {what} is missing: {path}"
        if _in_ci():
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    return path


def pytest_sessionstart(session):
    missing = [str(path) for path in SHARED_FILES.values() if not path.exists()]
    if _in_ci() and missing:
        pytest.exit(f"CI=true but ../shared is incomplete; missing: {missing}", returncode=1)


def random_variables(model, x, seed=0):
    """Variables with random weights AND random BatchNorm statistics."""
    return randomized(model.init(jax.random.key(seed), x), seed)


def randomized(variables, seed=0):
    """Random BatchNorm statistics and affine parameters (init leaves them trivial), for
    Linen variables and NNX states alike."""
    rng = np.random.default_rng(seed)

    def randomize(path, leaf):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = keys[-2] if keys[-1] == "value" else keys[-1]  # NNX: .../bias/value
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        if name in ("mean", "bias"):
            return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(randomize, variables)


@pytest.fixture(scope="session")
def tiny_vgg():
    model = VGG(cfg=(8, "M", 16, "M", 16, "M"), num_classes=10)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
    return model, random_variables(model, x), x


@pytest.fixture(scope="session")
def tiny_resnet():
    model = resnet18(widths=(4, 8, 8, 8))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 3)), jnp.float32)
    return model, random_variables(model, x), x
