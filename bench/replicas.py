"""Wall time of training k replicas: k separate runs vs each replica strategy of
``train.split.train_replicas``.

Usage::

    python bench/replicas.py --k 2 4 --width 0.25 --batch-size 64 --steps 20
    python bench/replicas.py --k 2 4 --devices 4   # also shard over 4 forced CPU devices

For every k, these ways of taking ``--steps`` SGD steps of all k replicas are timed side
by side in one process, on the same synthetic CIFAR-sized batches (generated up front and
already on the device, so only training is measured):

* ``separate runs`` (the baseline): k trainings one after another, all steps of replica 0
  with the jitted ``train.training.train_step``, then all of replica 1, ...;
* ``sequential``: the strategy of that name, every step the plain step of each replica;
* ``vmap``: one jitted vmapped step over the stacked states, on one device;
* ``shard``: the same step with the replica axis split over ``--devices`` devices (on a
  CPU host, forced with ``--xla_force_host_platform_device_count``, which this script sets
  before importing JAX).

The strategies are the objects ``train_replicas`` itself steps with; the row marked
``auto`` is the one it picks here (``train.split.choose_strategy``). Compilation is timed
separately (first step) and excluded from the per-step numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4], help="replica counts")
    parser.add_argument("--model", default="vgg11_bn", help="model name (models.registry)")
    parser.add_argument("--width", type=float, default=0.25, help="width multiplier")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per replica")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--devices", type=int, default=1, help="forced CPU devices (sharded)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per mode, best kept")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices > 1:  # must precede the first JAX import
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={ARGS.devices}"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from models.registry import create_model, init_variables  # noqa: E402
from train.split import _strategy, choose_strategy  # noqa: E402
from train.training import create_train_state, make_optimizer, train_step  # noqa: E402


def _batches(k: int, batch_size: int, steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.normal(size=(k, batch_size, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, (k, batch_size)).astype(np.int32),
        }
        for _ in range(steps + 1)
    ]


def _timed(run, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, best seconds of the others) of ``run(first)``."""
    start = time.perf_counter()
    run(True)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(False)
        best = min(best, time.perf_counter() - start)
    return first, best


def _separate_runs(model, optimizer, states, data, repeats):
    per_replica = [
        [jax.device_put({key: b[key][r] for key in b}) for b in data] for r in range(len(states))
    ]

    def run(first: bool):
        nonlocal states
        for r in range(len(states)):
            for batch in per_replica[r][:1] if first else per_replica[r][1:]:
                states[r], _ = train_step(states[r], batch, model=model, optimizer=optimizer)
        jax.block_until_ready(states)

    return _timed(run, repeats)


def _strategy_run(name, model, optimizer, states, data, devices, repeats):
    """Times ``train_replicas``' strategy ``name``; returns the timing and devices used."""
    k = len(states)
    runner = _strategy(name, k, model, optimizer, devices, None, 0.0)
    placed_states = runner.place(states)
    placed = [
        runner.batch({r: jax.device_put({key: b[key][r] for key in b}) for r in range(k)}, k)
        for b in data
    ]

    def run(first: bool):
        nonlocal placed_states
        for batch in placed[:1] if first else placed[1:]:
            placed_states, _ = runner.step(placed_states, batch)
        jax.block_until_ready(placed_states)

    used = len(runner.mesh.devices.flat) if hasattr(runner, "mesh") else 1
    return _timed(run, repeats), used


def _bench_k(model, k: int, args) -> list[dict]:
    optimizer = make_optimizer("base", steps_per_epoch=100, epochs=1)
    variables = [init_variables(model, r, (1, 32, 32, 3)) for r in range(k)]
    fresh = lambda: [
        create_train_state(model, v, optimizer, seed=r) for r, v in enumerate(variables)
    ]
    data = _batches(k, args.batch_size, args.steps)
    compile_s, seconds = _separate_runs(model, optimizer, fresh(), data, args.repeats)
    rows = [{"mode": "separate runs", "devices": 1, "compile": compile_s, "run": seconds}]
    names = ["sequential", "vmap"] + (["shard"] if args.devices > 1 else [])
    for name in names:
        (compile_s, seconds), used = _strategy_run(
            name, model, optimizer, fresh(), data, args.devices, args.repeats
        )
        rows.append({"mode": name, "devices": used, "compile": compile_s, "run": seconds})
    auto = choose_strategy(k)
    for row in rows:
        row["k"] = k
        row["auto"] = row["mode"] == auto
    return rows


def main(args: argparse.Namespace) -> None:
    model = create_model(args.model, 10, args.width)
    print(
        f"{args.model} x{args.width}, batch {args.batch_size} per replica, {args.steps} steps, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPU cores"
    )
    header = "| k | mode | devices | compile s | s/step (all k) | img/s | time vs separate runs |"
    print(header + "\n|---:|---|---:|---:|---:|---:|---:|")
    for k in args.k:
        rows = _bench_k(model, k, args)
        base = rows[0]["run"]
        for row in rows:
            per_step = row["run"] / args.steps
            images = k * args.batch_size / per_step
            mode = row["mode"] + (" (auto)" if row["auto"] else "")
            print(
                f"| {k} | {mode} | {row['devices']} | {row['compile']:.1f} | "
                f"{per_step:.4f} | {images:.0f} | {row['run'] / base:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main(ARGS)
