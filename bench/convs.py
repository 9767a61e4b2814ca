"""Convolutions of ResNet18 and VGG11 (CIFAR, batch 128), layer by layer, in each direction
(the convolution, its input gradient, its kernel gradient): XLA, the native AVX-512
kernels of ``models/_native.py`` and PyTorch side by side.

Candidates, each measured once per round, in turn (``bench/common.py``), all jitted with
``models.layers.XLA_CPU_OPTIONS`` (``XLA_CPU_INFERENCE_OPTIONS`` for the forward pass, as
ifjax evaluates):

* ``forward``: ``xla`` (``lax.conv_general_dilated``, NHWC/HWIO), ``native``
  (``models._native.conv2d``), ``torch`` (``F.conv2d`` under ``inference_mode``, NCHW);
* ``input`` (gradient): ``xla`` (the transpose of XLA's convolution), ``matmul`` (the
  transpose of the patches path of ``models/layers.py``), ``native``
  (``models._native.conv2d_input_grad``: native for stride 1, XLA's otherwise),
  ``torch`` (``torch.nn.grad.conv2d_input``);
* ``kernel`` (gradient): ``xla``, ``transposed`` (XLA's, its input made batch-minor by
  the native transpose: ifjax before the native gradients), ``native``
  (``models._native.conv2d_kernel_grad``), ``torch`` (``torch.nn.grad.conv2d_weight``).

Every candidate computes the same float32 result; the script checks it (max relative
difference to XLA's) and prints milliseconds per call (medians over rounds) and the ratios
to native (medians of per-round ratios; above 1: native is faster). PyTorch is skipped
with ``--no-torch`` or when it is not installed.

    python bench/convs.py                          # all layers, all directions (~6 min)
    python bench/convs.py --directions kernel --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402, F401  (ifjax's XLA flags, before JAX's backends start)
from bench.common import interleaved, machine, median_ratio  # noqa: E402
from models import (
    _native,  # noqa: E402
    layers,  # noqa: E402
)
from models.layers import XLA_CPU_INFERENCE_OPTIONS, XLA_CPU_OPTIONS  # noqa: E402

DIRECTIONS = ("forward", "input", "kernel")

#: (name, input (H, W, I), kernel (kh, kw, O), stride, padding): the distinct non-1x1
#: convolutions of CIFAR ResNet18 and VGG11.
LAYERS = [
    ("stem 32x32 3->64", (32, 32, 3), (3, 3, 64), 1, 1),
    ("32x32 64->64", (32, 32, 64), (3, 3, 64), 1, 1),
    ("32x32 64->128 s2", (32, 32, 64), (3, 3, 128), 2, 1),
    ("16x16 128->128", (16, 16, 128), (3, 3, 128), 1, 1),
    ("16x16 128->256 s2", (16, 16, 128), (3, 3, 256), 2, 1),
    ("8x8 256->256", (8, 8, 256), (3, 3, 256), 1, 1),
    ("8x8 256->512 s2", (8, 8, 256), (3, 3, 512), 2, 1),
    ("4x4 512->512", (4, 4, 512), (3, 3, 512), 1, 1),
    ("VGG 16x16 64->128", (16, 16, 64), (3, 3, 128), 1, 1),
    ("VGG 4x4 256->512", (4, 4, 256), (3, 3, 512), 1, 1),
    ("VGG 2x2 512->512", (2, 2, 512), (3, 3, 512), 1, 1),
]


def _timer(function, calls: int):
    def measure() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            function()
        return 1e3 * (time.perf_counter() - start) / calls

    return measure


def _candidates(direction, shape, spec, stride, pad, batch, torch_too: bool):
    rng = np.random.default_rng(0)
    (h, w, c), (kh, kw, o) = shape, spec
    x = rng.normal(size=(batch, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(kh, kw, c, o)).astype(np.float32)
    strides, padding = (stride, stride), ((pad, pad), (pad, pad))
    conv = functools.partial(layers._xla_conv, strides=strides, padding=padding, precision=None)
    matmul = functools.partial(
        layers._matmul_conv, strides=strides, padding=padding, precision=None
    )
    xj, kj = jax.device_put(x), jax.device_put(kernel)
    dy = rng.normal(size=conv(xj, kj).shape).astype(np.float32)
    dyj = jax.device_put(dy)
    x_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    k_shape = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
    # the gradients as transposes of the linear maps x -> f(x, k) and k -> f(x, k)
    input_grad = lambda f: lambda dy, k: jax.linear_transpose(lambda x: f(x, k), x_shape)(dy)[0]
    kernel_grad = lambda f: lambda x, dy: jax.linear_transpose(lambda k: f(x, k), k_shape)(dy)[0]
    if direction == "forward":
        args = (xj, kj)
        functions = {
            "xla": conv,
            "native": lambda x, k: _native.conv2d(x, k, strides, padding),
        }
    elif direction == "input":
        args = (dyj, kj)
        functions = {
            "xla": input_grad(conv),
            "matmul": input_grad(matmul),
            "native": lambda dy, k: _native.conv2d_input_grad(dy, k, strides, padding, (h, w)),
        }
    else:
        args = (xj, dyj)
        transposed = functools.partial(
            layers._kernel_term, "transposed", strides=strides, padding=padding, precision=None
        )
        functions = {
            "xla": kernel_grad(conv),
            "transposed": kernel_grad(transposed),
            "native": lambda x, dy: _native.conv2d_kernel_grad(x, dy, strides, padding, (kh, kw)),
        }
    options = XLA_CPU_INFERENCE_OPTIONS if direction == "forward" else XLA_CPU_OPTIONS
    outputs, runs = {}, {}
    for name, function in functions.items():
        jitted = jax.jit(function, compiler_options=options)
        outputs[name] = np.asarray(jitted(*args))
        runs[name] = functools.partial(lambda f, a: f(*a).block_until_ready(), jitted, args)
    if torch_too:
        import torch
        import torch.nn.functional as F

        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        kt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        dyt = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
        grad = torch.nn.grad

        def run_torch():
            with torch.inference_mode():
                if direction == "forward":
                    return F.conv2d(xt, kt, stride=stride, padding=pad)
                if direction == "input":
                    return grad.conv2d_input(xt.shape, kt, dyt, stride=stride, padding=pad)
                return grad.conv2d_weight(xt, kt.shape, dyt, stride=stride, padding=pad)

        layout = (0, 2, 3, 1) if direction != "kernel" else (2, 3, 1, 0)
        outputs["torch"] = run_torch().numpy().transpose(layout)
        runs["torch"] = run_torch
    scale = float(np.abs(outputs["xla"]).max())
    errors = {k: float(np.abs(v - outputs["xla"]).max()) / scale for k, v in outputs.items()}
    return runs, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per measurement")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    parser.add_argument("--layers", nargs="+", help="only layers whose name contains one of these")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not _native.conv2d_available():
        sys.exit("the native convolution is not available here (needs AVX-512 and a C++ compiler)")
    torch_too = not args.no_torch
    if torch_too:
        try:
            import torch
        except ImportError:
            torch_too = False
            print("PyTorch is not installed: ifjax only")
    info = machine()
    if torch_too:
        torch.set_num_threads(info["cores"] or 1)
        info["torch_threads"] = torch.get_num_threads()
    print(json.dumps(info))
    tables, results = {}, []
    for direction in args.directions:
        rows = []
        for name, shape, spec, stride, pad in LAYERS:
            if args.layers and not any(part in name for part in args.layers):
                continue
            runs, errors = _candidates(
                direction, shape, spec, stride, pad, args.batch_size, torch_too
            )
            for run in runs.values():
                run()  # warm-up
            measures = {k: _timer(v, args.calls) for k, v in runs.items()}
            values = interleaved(measures, args.rounds, log=lambda line: None)
            ms = {k: statistics.median(v) for k, v in values.items()}
            ratios = {f"{k}/native": median_ratio(values[k], values["native"]) for k in values}
            del ratios["native/native"]
            print(
                f"{direction} {name}: "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                + "; "
                + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
                flush=True,
            )
            results.append(
                {
                    "direction": direction,
                    "layer": name,
                    "ms": ms,
                    "ratios": ratios,
                    "errors": errors,
                }
            )
            cells = [f"{ms[k]:.1f}" for k in runs] + [f"{v:.2f}" for v in ratios.values()]
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {max(errors.values()):.1e} |")
        header = list(runs) + list(ratios)
        tables[direction] = [
            "| layer | " + " | ".join(header) + " | max rel. difference |",
            "|---|" + "---|" * (len(header) + 1),
            *rows,
        ]
    print(f"\nbatch {args.batch_size}, {args.rounds} rounds x {args.calls} calls, ms per call")
    for direction, table in tables.items():
        print(f"\n{direction}:")
        print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "layers": results}, indent=1))


if __name__ == "__main__":
    main()
