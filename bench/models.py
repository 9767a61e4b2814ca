"""Training and evaluation throughput of the ifjax models vs the same networks in PyTorch.

Usage::

    python bench/models.py                                  # VGG11-BN and ResNet18, batch 128
    python bench/models.py --models vgg11_bn --rounds 5 --batch-size 64
    python bench/models.py --modes auto --no-torch          # only the fast path

PyTorch is the ``bench`` extra (``pip install torch==2.13.0``, a CPU build); the library
never imports it. The PyTorch networks are written below, layer for layer the CIFAR
VGG11-BN and ResNet18 of ``models/`` (convolutions with bias, BatchNorm, same widths).

Candidates, all measured in one process, interleaved (one measurement of each per round):

* ``ifjax xla``: ``train.training.train_step``/``eval_step`` with ``IFJAX_CONV=xla``,
  i.e. plain ``nn.Conv`` (``lax.conv_general_dilated``), compiled with jaxlib's default
  XLA:CPU options: JAX as installed, before ifjax's changes;
* ``ifjax auto``: the same with the CPU fast path of ``models/layers.py`` and ifjax's
  XLA:CPU options (``models.layers.XLA_CPU_OPTIONS`` for the training step,
  ``XLA_CPU_INFERENCE_OPTIONS`` for evaluation, as the library runs them);
* optional modes (``--modes``): ``auto-jaxlib-flags`` (fast path, jaxlib's options) and
  ``xla-ifjax-flags`` (plain convolutions, ifjax's options) separate the two changes,
  ``auto-train-flags`` evaluates with the training options, ``auto-xla-forward`` computes
  convolutions with XLA instead of the native kernel (``IFJAX_NATIVE_CONV=0``);
* ``torch``: SGD step (momentum 0.9, weight decay 5e-4, cross-entropy) and
  ``inference_mode`` evaluation (logits, loss, accuracy) of the PyTorch network.

Both frameworks evaluate the weights their training steps have reached so far.

Each JAX mode gets its own jitted copies of the training/evaluation functions, traced
with its ``IFJAX_CONV``. The first call (compilation included) is reported separately; the
throughputs are medians over rounds, the ratios medians of per-round ratios. The images
are random (B, 32, 32, 3) arrays already on the device, so only the step is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    conv_implementation,
    interleaved,
    machine,
    median_ratio,
    stopwatch,
)
from models.layers import (  # noqa: E402
    XLA_CPU_DEFAULT_OPTIONS,
    XLA_CPU_INFERENCE_OPTIONS,
    XLA_CPU_OPTIONS,
)
from models.registry import create_model  # noqa: E402
from models.vgg import VGG11_CFG  # noqa: E402
from train import training  # noqa: E402

__all__ = ["main", "torch_resnet18", "torch_vgg11_bn"]

MODELS = ("vgg11_bn", "resnet18")
MODES = ("xla", "auto")
#: mode -> (IFJAX_CONV, XLA:CPU compile options of the training step, of the evaluation
#: step[, other environment variables]). ``xla``: plain ``nn.Conv``/``nn.max_pool`` and
#: jaxlib's default options (YNNPACK convolutions), i.e. JAX as installed; ``auto``: ifjax
#: (fast path, :data:`models.layers.XLA_CPU_OPTIONS` for training and
#: :data:`models.layers.XLA_CPU_INFERENCE_OPTIONS` for evaluation, as
#: ``train.training.train_step``/``eval_step`` run); ``auto-jaxlib-flags`` and
#: ``xla-ifjax-flags`` separate the two changes; ``auto-train-flags`` evaluates with the
#: training options; ``auto-xla-forward`` computes the convolutions themselves with XLA
#: instead of the native kernel (``IFJAX_NATIVE_CONV=0``); ``auto-native-forward`` uses the
#: native kernel for the convolutions only, their gradients by XLA as before
#: (``IFJAX_NATIVE_CONV=forward``); ``matmul``: the matmul path everywhere.
MODE_SETTINGS = {
    "xla": ("xla", XLA_CPU_DEFAULT_OPTIONS, XLA_CPU_DEFAULT_OPTIONS),
    "auto": ("auto", XLA_CPU_OPTIONS, XLA_CPU_INFERENCE_OPTIONS),
    "auto-jaxlib-flags": ("auto", XLA_CPU_DEFAULT_OPTIONS, XLA_CPU_DEFAULT_OPTIONS),
    "auto-train-flags": ("auto", XLA_CPU_OPTIONS, XLA_CPU_OPTIONS),
    "auto-xla-forward": (
        "auto",
        XLA_CPU_OPTIONS,
        XLA_CPU_INFERENCE_OPTIONS,
        {"IFJAX_NATIVE_CONV": "0"},
    ),
    "auto-native-forward": (
        "auto",
        XLA_CPU_OPTIONS,
        XLA_CPU_INFERENCE_OPTIONS,
        {"IFJAX_NATIVE_CONV": "forward"},
    ),
    "xla-ifjax-flags": ("xla", XLA_CPU_OPTIONS, XLA_CPU_INFERENCE_OPTIONS),
    "matmul": ("matmul", XLA_CPU_OPTIONS, XLA_CPU_INFERENCE_OPTIONS),
}


# ----------------------------------------------------------------------------- PyTorch


def torch_vgg11_bn(num_classes: int = 10):
    """VGG11-BN, CIFAR layout: conv3x3(bias)-BN-ReLU blocks, 2x2 max-pools, one Linear."""
    from torch import nn

    layers, width = [], 3
    for c in VGG11_CFG:
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers += [nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        width = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width, num_classes))


def torch_resnet18(num_classes: int = 10):
    """CIFAR ResNet18: 3x3 stem, basic blocks [2, 2, 2, 2], 4x4 average pool, Linear."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, width_in: int, width: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(width_in, width, 3, stride, 1)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1)
            self.bn2 = nn.BatchNorm2d(width)
            self.shortcut = nn.Identity()
            if stride != 1 or width_in != width:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(width_in, width, 1, stride), nn.BatchNorm2d(width)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    blocks, width_in = [], 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for b in range(2):
            blocks.append(BasicBlock(width_in, width, 2 if stage > 0 and b == 0 else 1))
            width_in = width
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        *blocks,
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


def _torch_functions(name: str, images: np.ndarray, labels: np.ndarray):
    """(train_steps(k), eval_batches(k)) of the PyTorch network, on NCHW copies."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = {"vgg11_bn": torch_vgg11_bn, "resnet18": torch_resnet18}[name]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))

    def train(steps: int) -> None:
        model.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

    def evaluate(batches: int) -> None:
        model.eval()
        with torch.inference_mode():
            for _ in range(batches):
                logits = model(x)
                F.cross_entropy(logits, y, reduction="sum").item()
                (logits.argmax(1) == y).sum().item()

    return train, evaluate


# ----------------------------------------------------------------------------- ifjax


def _fresh_jits(train_options: dict[str, str], eval_options: dict[str, str]):
    """New jits of ``train_step``/``eval_step``, traced afresh under the current ``IFJAX_CONV``
    and compiled with these XLA options.

    JAX caches traces by the Python function (and static arguments), not by the ``jit``
    object, so each mode needs its own function objects, not just new ``jax.jit`` wrappers.
    """

    def train_step(state, batch, *, model, optimizer):
        return training.train_step.__wrapped__(state, batch, model=model, optimizer=optimizer)

    def eval_step(variables, batch, *, model):
        return training.eval_step.__wrapped__(variables, batch, model=model)

    return (
        jax.jit(train_step, static_argnames=("model", "optimizer"), compiler_options=train_options),
        jax.jit(eval_step, static_argnames=("model",), compiler_options=eval_options),
    )


def _jax_functions(name: str, mode: str, images: np.ndarray, labels: np.ndarray):
    """(train_steps(k), eval_batches(k), first-call seconds, logits) of one JAX mode."""
    model = create_model(name)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    optimizer = training.make_optimizer("base", steps_per_epoch=391, epochs=300)
    conv, train_options, eval_options, *environment = MODE_SETTINGS[mode]
    with conv_implementation(conv, **(environment[0] if environment else {})):
        variables = model.init(jax.random.key(0), batch["image"][:1])
        state = training.create_train_state(model, variables, optimizer)
        train_step, eval_step = _fresh_jits(train_options, eval_options)
        first_train = stopwatch(
            lambda: jax.block_until_ready(
                train_step(state, batch, model=model, optimizer=optimizer)
            )
        )
        first_eval = stopwatch(
            lambda: jax.block_until_ready(eval_step(variables, batch, model=model))
        )
        logits = jax.jit(lambda v, x: model.apply(v, x), compiler_options=eval_options)
        logits = np.asarray(logits(variables, batch["image"]))
    current = [state]

    def train(steps: int) -> None:
        for _ in range(steps):
            current[0], out = train_step(current[0], batch, model=model, optimizer=optimizer)
        jax.block_until_ready((current[0], out))

    def evaluate(batches: int) -> None:
        # The weights trained so far, as the PyTorch network evaluates its own.
        trained = {"params": current[0].params, "batch_stats": current[0].batch_stats}
        for _ in range(batches):
            out = eval_step(trained, batch, model=model)
            int(out["correct"]), float(out["loss_sum"])

    return train, evaluate, {"train": first_train, "eval": first_eval}, logits


# ----------------------------------------------------------------------------- runner


def _throughput(run: Callable[[int], None], count: int, batch_size: int) -> Callable[[], float]:
    def measure() -> float:
        start = time.perf_counter()
        run(count)
        return count * batch_size / (time.perf_counter() - start)

    return measure


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved training and evaluation images/s of every candidate for one model."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch_size).astype(np.int32)
    candidates: dict[str, Any] = {}
    first_call, logits = {}, {}
    for mode in args.modes:
        train, evaluate, first_call[mode], logits[mode] = _jax_functions(name, mode, images, labels)
        candidates[f"ifjax {mode}"] = (train, evaluate)
        print(f"{name}: ifjax {mode} first call (compilation included) {first_call[mode]}")
    if not args.no_torch:
        candidates["torch"] = _torch_functions(name, images, labels)
    measures = {}
    for kind, count in (("train", args.train_steps), ("eval", args.eval_batches)):
        for candidate, functions in candidates.items():
            run = functions[0 if kind == "train" else 1]
            run(1)  # warm-up
            measures[f"{kind} {candidate}"] = _throughput(run, count, args.batch_size)
    print(f"{name}: {args.rounds} rounds of {list(measures)}")
    values = interleaved(measures, args.rounds)
    return {
        "model": name,
        "images_per_second": {k: statistics.median(v) for k, v in values.items()},
        "rounds": values,
        "first_call_seconds": first_call,
        "max_logit_difference": {
            mode: float(np.abs(logits[mode] - logits[args.modes[0]]).max()) for mode in args.modes
        },
    }


def _table(results: list[dict[str, Any]], modes, torch: bool) -> str:
    lines = [
        "| model | conv | train img/s | eval img/s | train ifjax/torch | eval ifjax/torch |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        rounds, ips = result["rounds"], result["images_per_second"]
        rows = [(f"ifjax {m}", m) for m in modes] + ([("torch", "PyTorch")] if torch else [])
        for candidate, label in rows:
            cells = [f"{ips[f'{kind} {candidate}']:.1f}" for kind in ("train", "eval")]
            for kind in ("train", "eval"):
                if torch and candidate != "torch":
                    ratio = median_ratio(rounds[f"{kind} {candidate}"], rounds[f"{kind} torch"])
                    cells.append(f"{ratio:.2f}")
                else:
                    cells.append("")
            lines.append(f"| {result['model']} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODE_SETTINGS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--train-steps", type=int, default=2, help="steps per measurement")
    parser.add_argument("--eval-batches", type=int, default=2, help="batches per measurement")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    """Runs the benchmark described in the module docstring and prints a table."""
    args = _parse()
    info = machine()
    if not args.no_torch:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    print(json.dumps(info))
    results = [benchmark_model(name, args) for name in args.models]
    load = os.getloadavg()[0]
    print(f"\nbatch {args.batch_size}, {args.rounds} rounds; load average now {load:.1f}")
    print(_table(results, args.modes, not args.no_torch))
    for r in results:
        first = r["first_call_seconds"]
        difference = r["max_logit_difference"]
        print(f"{r['model']}: max |logits - logits {args.modes[0]}| {difference}")
        print(f"{r['model']}: first calls (s, compilation included) {first}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
