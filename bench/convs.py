"""Forward convolutions of ResNet18 and VGG11 (CIFAR, batch 128), layer by layer: XLA's
convolution, the native AVX-512 kernel of ``models/_native.py`` and PyTorch side by side.

Candidates, each measured once per round, in turn (``bench/common.py``):

* ``xla``: ``lax.conv_general_dilated`` (NHWC/HWIO) jitted with
  ``models.layers.XLA_CPU_INFERENCE_OPTIONS``, as ifjax evaluates;
* ``native``: ``models._native.conv2d`` in the same kind of jit;
* ``torch``: ``F.conv2d`` under ``inference_mode`` on NCHW tensors, as the paper's code
  runs (skipped with ``--no-torch`` or when PyTorch is not installed).

Every candidate computes the same float32 result; the script checks it (max relative
difference to XLA's) and prints milliseconds per call (medians over rounds) and the ratios
xla/native and torch/native (medians of per-round ratios; above 1: native is faster).

    python bench/convs.py                      # all layers, 5 rounds (~2 min on 2 cores)
    python bench/convs.py --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import models  # noqa: E402, F401  (ifjax's XLA flags, before JAX's backends start)
from bench.common import interleaved, machine, median_ratio  # noqa: E402
from models import _native  # noqa: E402
from models.layers import XLA_CPU_INFERENCE_OPTIONS  # noqa: E402

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


def _candidates(shape, spec, stride, pad, batch, torch_too: bool):
    rng = np.random.default_rng(0)
    (h, w, c), (kh, kw, o) = shape, spec
    x = rng.normal(size=(batch, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(kh, kw, c, o)).astype(np.float32)
    strides, padding = (stride, stride), ((pad, pad), (pad, pad))
    numbers = ("NHWC", "HWIO", "NHWC")
    xla = jax.jit(
        lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=numbers),
        compiler_options=XLA_CPU_INFERENCE_OPTIONS,
    )
    native = jax.jit(
        lambda x, k: _native.conv2d(x, k, strides, padding),
        compiler_options=XLA_CPU_INFERENCE_OPTIONS,
    )
    xj, kj = jax.device_put(x), jax.device_put(kernel)
    outputs = {"xla": np.asarray(xla(xj, kj)), "native": np.asarray(native(xj, kj))}
    runs = {
        "xla": lambda: xla(xj, kj).block_until_ready(),
        "native": lambda: native(xj, kj).block_until_ready(),
    }
    if torch_too:
        import torch
        import torch.nn.functional as F

        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        kt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))

        def run_torch():
            with torch.inference_mode():
                return F.conv2d(xt, kt, stride=stride, padding=pad)

        outputs["torch"] = run_torch().numpy().transpose(0, 2, 3, 1)
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
    rows, results = [], []
    for name, shape, spec, stride, pad in LAYERS:
        runs, errors = _candidates(shape, spec, stride, pad, args.batch_size, torch_too)
        for run in runs.values():
            run()  # warm-up
        measures = {k: _timer(v, args.calls) for k, v in runs.items()}
        values = interleaved(measures, args.rounds, log=lambda line: None)
        ms = {k: statistics.median(v) for k, v in values.items()}
        ratios = {f"{k}/native": median_ratio(values[k], values["native"]) for k in values}
        del ratios["native/native"]
        print(
            f"{name}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
            + "; "
            + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
            flush=True,
        )
        results.append({"layer": name, "ms": ms, "ratios": ratios, "errors": errors})
        cells = [f"{ms[k]:.1f}" for k in runs] + [f"{v:.2f}" for v in ratios.values()]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {max(errors.values()):.1e} |")
    header = list(runs) + list(ratios)
    print(f"\nbatch {args.batch_size}, {args.rounds} rounds x {args.calls} calls, ms per call")
    print("| layer | " + " | ".join(header) + " | max rel. difference |")
    print("|---|" + "---|" * (len(header) + 1))
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "layers": results}, indent=1))


if __name__ == "__main__":
    main()
