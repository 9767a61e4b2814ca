"""Tests for train.training: schedules, SGD, jitted steps, evaluation, fit and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import VGG
from models.registry import init_variables
from train.training import (
    METRIC_COLUMNS,
    create_train_state,
    cross_entropy,
    eval_step,
    evaluate,
    fit,
    learning_rate_schedule,
    make_optimizer,
    train_step,
)

MODEL = VGG(cfg=(4, "M", 8, "M"), num_classes=3)
PROTOTYPES = np.random.default_rng(123).normal(size=(3, 8, 8, 3)).astype(np.float32)
STEPS_PER_EPOCH = 4
BATCH = 16
TIMING = ("epoch_seconds", "images_per_second")


def _batch(seed, size=BATCH):
    """A learnable task: the label's prototype image plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size).astype(np.int32)
    images = PROTOTYPES[labels] + 0.7 * rng.normal(size=(size, 8, 8, 3))
    return {"image": images.astype(np.float32), "label": labels}


def _train_batches(epoch, start_step):
    for step in range(start_step, STEPS_PER_EPOCH):
        yield _batch(1000 * epoch + step)


def _eval_batches():
    return [_batch(-1 % 10_000 + i) for i in range(2)] + [_batch(777, size=5)]


@pytest.fixture(scope="module")
def variables():
    return init_variables(MODEL, 0, (1, 8, 8, 3))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_step_decay_schedules_at_epoch_boundaries():
    spe = 10
    base = learning_rate_schedule("base", spe, epochs=300)
    finetune = learning_rate_schedule("finetune", spe, epochs=100)
    for step, expected in [(0, 0.05), (30 * spe - 1, 0.05), (30 * spe, 0.025), (60 * spe, 0.0125)]:
        np.testing.assert_allclose(float(base(step)), expected, rtol=1e-6)
        np.testing.assert_allclose(float(finetune(step)), expected / 5, rtol=1e-6)
    np.testing.assert_allclose(float(base(299 * spe)), 0.05 * 0.5**9, rtol=1e-6)


def test_fast_schedule_warms_up_then_decays():
    schedule = learning_rate_schedule("fast", steps_per_epoch=10, epochs=10)  # 100 steps
    values = np.array([float(schedule(step)) for step in range(101)])
    np.testing.assert_allclose(values[0], 0.01, rtol=1e-6)
    np.testing.assert_allclose(values[15], 0.1, rtol=1e-6)  # Peak after 15% of the steps.
    assert np.all(np.diff(values[:16]) > 0) and np.all(np.diff(values[15:]) <= 0)
    np.testing.assert_allclose(values[100], 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate_schedule("cyclic", 10, 10)


def test_sgd_with_coupled_weight_decay_matches_torch_formula():
    optimizer = make_optimizer("base", 10, 1, momentum=0.9, weight_decay=0.1)
    params = {"w": jnp.array([1.0, -2.0])}
    g1, g2 = {"w": jnp.array([0.5, 0.5])}, {"w": jnp.array([-1.0, 0.0])}
    state = optimizer.init(params)
    u1, state = optimizer.update(g1, state, params)
    p1 = optax.apply_updates(params, u1)
    buf1 = np.array([0.5, 0.5]) + 0.1 * np.array([1.0, -2.0])  # grad + wd * param
    np.testing.assert_allclose(p1["w"], np.array([1.0, -2.0]) - 0.05 * buf1, rtol=1e-6)
    u2, state = optimizer.update(g2, state, p1)
    buf2 = 0.9 * buf1 + (np.array([-1.0, 0.0]) + 0.1 * np.asarray(p1["w"]))
    np.testing.assert_allclose(
        np.asarray(p1["w"] + u2["w"]), np.asarray(p1["w"]) - 0.05 * buf2, rtol=1e-6
    )


def test_train_steps_reduce_loss_update_batchnorm_and_compile_once(variables):
    model = VGG(cfg=(4, "M", 8, "M"), num_classes=3, use_bias=False)  # Fresh jit cache entry.
    variables = init_variables(model, 0, (1, 8, 8, 3))
    optimizer = make_optimizer("fast", steps_per_epoch=10, epochs=3)
    state = create_train_state(model, variables, optimizer)
    batches = [_batch(i, 32) for i in range(10)]
    before = evaluate(model, state.variables, batches)["loss"]
    compiled = train_step._cache_size()
    for batch in batches * 3:
        state, metrics = train_step(state, batch, model=model, optimizer=optimizer)
    assert train_step._cache_size() == compiled + 1
    assert int(state.step) == 30
    after = evaluate(model, state.variables, batches)["loss"]
    assert after < 0.5 * before, (before, after)
    assert 0 <= float(metrics["accuracy"]) <= 1
    assert not np.allclose(
        state.batch_stats["bn0"]["mean"], variables["batch_stats"]["bn0"]["mean"]
    )


def test_evaluate_weights_partial_last_batch_and_compiles_once(variables):
    model = VGG(cfg=(4, "M", 8, "M"), num_classes=3, use_bias=True)
    batches = [_batch(1, 8), _batch(2, 8), _batch(3, 3)]
    compiled = eval_step._cache_size()
    result = evaluate(model, variables, batches)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    logits = np.asarray(model.apply(variables, images, train=False), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert result["count"] == 19
    np.testing.assert_allclose(result["loss"], -log_probs[np.arange(19), labels].mean(), rtol=1e-5)
    assert result["top1"] == np.mean(logits.argmax(-1) == labels)
    assert eval_step._cache_size() <= compiled + 1
    evaluate(model, variables, [_batch(4, 8), _batch(5, 6)])  # New data, other partial size.
    assert eval_step._cache_size() <= compiled + 1


def test_create_train_state_rejects_variables_of_another_width(variables):
    pruned = VGG(cfg=(2, "M", 8, "M"), num_classes=3)
    with pytest.raises(ValueError, match="for_variables"):
        create_train_state(pruned, variables, make_optimizer("base", 1, 1))


def _fit(variables, workdir, **kwargs):
    options = dict(
        train_batches=_train_batches,
        eval_batches=_eval_batches,
        epochs=3,
        steps_per_epoch=STEPS_PER_EPOCH,
        optimizer_kind="fast",
        workdir=workdir,
        seed=0,
        log_every=None,
    )
    return fit(MODEL, variables, **(options | kwargs))


def _without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, variables):
    """An uninterrupted run, with its workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    final, history = _fit(variables, workdir)
    return workdir, final, history


def test_fit_writes_metrics_and_keeps_two_checkpoints(reference):
    workdir, final, history = reference
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["step"] for r in history] == [4, 8, 12]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0 <= r["test_top1"] <= 1 for r in history)
    assert history[-1]["test_top1"] > 0.8
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    rows = (workdir / "metrics.csv").read_text().splitlines()
    assert rows[0] == ",".join(METRIC_COLUMNS)
    assert [float(v) for v in rows[3].split(",")] == [history[2][c] for c in METRIC_COLUMNS]
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert checkpoints == ["step_000000008", "step_000000012"]


def test_resume_after_max_steps_equals_uninterrupted_run(tmp_path, variables, reference):
    _, final, history = reference
    _, partial = _fit(variables, tmp_path, max_steps=6)  # Stops inside epoch 2.
    assert len(partial) == 1
    resumed, resumed_history = _fit(variables, tmp_path)
    _assert_trees_equal(resumed, final)
    assert _without_timing(resumed_history) == _without_timing(history)


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, variables, reference):
    _, final, history = reference
    served = []

    def crashing_batches(epoch, start_step):
        for batch in _train_batches(epoch, start_step):
            if len(served) == 7:
                raise RuntimeError("killed")
            served.append((epoch, start_step))
            yield batch

    with pytest.raises(RuntimeError, match="killed"):
        _fit(variables, tmp_path, train_batches=crashing_batches, checkpoint_every_steps=3)
    # Killed during step 8; the newest checkpoint is the one of step 6 (epoch 2, step 2).
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step_000000006"
    resumed, resumed_history = _fit(variables, tmp_path, checkpoint_every_steps=3)
    _assert_trees_equal(resumed, final)
    assert _without_timing(resumed_history) == _without_timing(history)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert _without_timing([json.loads(r) for r in rows]) == _without_timing(history)


def test_finished_run_resumes_to_its_result(reference, variables, tmp_path):
    workdir, final, history = reference
    shutil.copytree(workdir, tmp_path / "copy")
    again, again_history = _fit(variables, tmp_path / "copy")
    _assert_trees_equal(again, final)
    assert again_history == history


def test_corrupt_checkpoint_is_named(reference, variables, tmp_path):
    shutil.copytree(reference[0], tmp_path / "copy")
    newest = tmp_path / "copy" / "checkpoints" / "step_000000012"
    (newest / "ifjax_checkpoint.json").write_text("{truncated")
    with pytest.raises(ValueError, match=str(newest / "ifjax_checkpoint.json")):
        _fit(variables, tmp_path / "copy")


def test_checkpoint_of_another_model_is_rejected(reference, tmp_path):
    shutil.copytree(reference[0], tmp_path / "copy")
    other = VGG(cfg=(4, "M", 6, "M"), num_classes=3)
    with pytest.raises(ValueError, match="does not match this model: params/.*1/.* has shape"):
        fit(
            other,
            init_variables(other, 0, (1, 8, 8, 3)),
            train_batches=_train_batches,
            eval_batches=_eval_batches,
            epochs=3,
            steps_per_epoch=STEPS_PER_EPOCH,
            optimizer_kind="fast",
            workdir=tmp_path / "copy",
            log_every=None,
        )


def test_checkpoint_of_another_config_is_rejected(reference, variables, tmp_path):
    shutil.copytree(reference[0], tmp_path / "copy")
    with pytest.raises(ValueError, match="config"):
        _fit(variables, tmp_path / "copy", optimizer_kind="finetune")


def test_checkpoint_of_another_label_smoothing_is_rejected(reference, variables, tmp_path):
    shutil.copytree(reference[0], tmp_path / "copy")
    with pytest.raises(ValueError, match="label_smoothing"):
        _fit(variables, tmp_path / "copy", label_smoothing=0.1)


def test_cross_entropy_smooths_targets_toward_uniform():
    logits = jax.random.normal(jax.random.key(0), (5, 4))
    labels = jnp.array([0, 1, 2, 3, 1])
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    targets = 0.8 * np.eye(4)[np.asarray(labels)] + 0.2 / 4
    np.testing.assert_allclose(
        cross_entropy(logits, labels, 0.2), -(targets * log_probs).sum(-1), rtol=1e-5
    )
    plain = -log_probs[np.arange(5), np.asarray(labels)]
    np.testing.assert_allclose(cross_entropy(logits, labels), plain, rtol=1e-5)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\)"):
            cross_entropy(logits, labels, bad)


def test_train_step_with_label_smoothing_descends_the_smoothed_loss(variables):
    optimizer = make_optimizer("finetune", steps_per_epoch=1, epochs=1)
    state = create_train_state(MODEL, variables, optimizer)
    batch = _batch(5)
    logits, _ = MODEL.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    smoothed, plain = {}, {}
    for s, out in ((0.3, smoothed), (0.0, plain)):
        new, metrics = train_step(state, batch, model=MODEL, optimizer=optimizer, label_smoothing=s)
        out.update(metrics=metrics, params=new.params)
    expected = float(cross_entropy(logits, batch["label"], 0.3).mean())
    np.testing.assert_allclose(float(smoothed["metrics"]["loss"]), expected, rtol=1e-5)
    assert float(smoothed["metrics"]["loss"]) > float(plain["metrics"]["loss"])
    grads = jax.grad(
        lambda p: cross_entropy(
            MODEL.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )[0],
            batch["label"],
            0.3,
        ).mean()
    )(variables["params"])
    # SGD from a zero momentum buffer: the first step is -lr * (gradient + wd * params)
    lr = float(learning_rate_schedule("finetune", 1, 1)(0))
    expected_params = jax.tree.map(lambda p, g: p - lr * (g + 5e-4 * p), variables["params"], grads)
    for got, want in zip(
        jax.tree.leaves(smoothed["params"]), jax.tree.leaves(expected_params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_progress_lines_without_a_terminal(variables, capsys):
    _fit(variables, None, epochs=1, log_every=2, progress_bar=False)
    out = capsys.readouterr().out
    assert "step 2/4" in out and "step 4/4" in out and "ETA" in out
    assert "epoch 1/1: train loss" in out


_KILLED_RUN = """
import os, signal, sys
from tests.test_training import _train_batches, _fit, MODEL
from models.registry import init_variables

kill_at = int(sys.argv[2])
served = []

def batches(epoch, start_step):
    for batch in _train_batches(epoch, start_step):
        if len(served) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally, no flush
        served.append(1)
        yield batch

_fit(init_variables(MODEL, 0, (1, 8, 8, 3)), sys.argv[1], train_batches=batches,
     checkpoint_every_steps=1)
"""


@pytest.mark.parametrize("kill_at", [2, 9])  # inside epoch 1 and inside epoch 3
def test_kill_9_at_any_step_then_the_same_command_equals_uninterrupted(
    tmp_path, variables, reference, kill_at
):
    """A process killed with SIGKILL during step ``kill_at + 1``; the same run started again
    resumes from the newest checkpoint and ends where the uninterrupted run ends."""
    _, final, history = reference
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(tmp_path), str(kill_at)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    newest = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1]
    assert newest == f"step_{kill_at:09d}"
    resumed, resumed_history = _fit(variables, tmp_path, checkpoint_every_steps=1)
    _assert_trees_equal(resumed, final)
    assert _without_timing(resumed_history) == _without_timing(history)
