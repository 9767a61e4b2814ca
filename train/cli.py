"""The ``ifjax`` command line: train, eval, prune, finetune, datafree, demo, split-train,
fap and paf.

Examples::

    ifjax demo                                   # the whole job in ~10 min on a CPU
    ifjax train --model vgg11_bn --dataset cifar10 --epochs 300 --workdir runs/vgg
    ifjax eval --checkpoint runs/vgg/model
    ifjax prune --checkpoint runs/vgg/model --groups all --sparsity 0.5 --out runs/vgg50
    ifjax finetune --checkpoint runs/vgg50 --epochs 80 --workdir runs/vgg50-ft
    ifjax datafree --checkpoint runs/vgg/model --out runs/vgg-datafree
    ifjax paf --model vgg11_bn --k 2 --epochs 300 --sparsity 0.6 --workdir runs/paf

``split-train``, ``fap`` and ``paf`` resume in their ``--workdir`` (``--overwrite``
starts over) and run on several hosts with ``--distributed`` (``docs/multihost.md``).

Bad arguments (an unknown model, a sparsity outside [0, 1), an unknown group, a missing
checkpoint, ...) end with one line ``ifjax: error: ...`` and exit status 2. JAX's
persistent compilation cache is on (``~/.cache/ifjax/jax``; ``--compilation-cache DIR``
or ``off``, or ``$IFJAX_COMPILATION_CACHE``). The work itself is in :mod:`train.jobs`
and :mod:`train.pipelines`; every command's arguments are generated
(:mod:`train.options`) from its options dataclass (:mod:`train.commands`,
:class:`train.pipelines.FapOptions`, ...), which holds their defaults, help and checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ifjax import GraphError
from train import commands, jobs
from train.data import DatasetUnavailableError
from train.options import (
    NONNEGATIVE_INT,
    POSITIVE_INT,
    Options,
    add_options,
    option,
    options_from_args,
)
from train.pipelines import FapOptions, PipelineOptions, SplitOptions

__all__ = ["main", "parser"]

# Errors that mean "bad input", reported in one line; anything else is a bug: traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, DatasetUnavailableError, GraphError)


@dataclasses.dataclass(frozen=True)
class SplitTarget(Options):
    """The model and dataset of the split-data commands."""

    model: str = option("vgg11_bn", choices=commands.MODELS)
    dataset: str = option("cifar10", choices=commands.DATASETS)


@dataclasses.dataclass(frozen=True)
class Hosts(Options):
    """How the split-data commands start on several hosts (``docs/multihost.md``)."""

    distributed: bool = option(
        False, help="call jax.distributed.initialize() first; run the same command on every host"
    )
    coordinator_address: str | None = option(
        None,
        help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS or what JAX "
        "detects on SLURM, Open MPI, Kubernetes, Cloud TPU)",
    )
    num_processes: int | None = option(None, check=POSITIVE_INT, help="default: detected")
    process_id: int | None = option(None, check=NONNEGATIVE_INT, help="0..N-1; default: detected")

    def __post_init__(self) -> None:
        super().__post_init__()
        given = self.given()
        if not self.distributed and given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} given without --distributed")
        if given.get("process_id", -1) >= given.get("num_processes", sys.maxsize):
            raise ValueError(
                f"--process-id must be below --num-processes ({given['num_processes']}), "
                f"got {given['process_id']}"
            )

    def given(self) -> dict[str, Any]:
        """The ``jax.distributed.initialize`` arguments given (the others: detected)."""
        names = ("coordinator_address", "num_processes", "process_id")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


_SPLIT_COMMANDS = {
    "split-train": ("train k replicas on disjoint splits at once", SplitOptions),
    "fap": ("fuse -> fine-tune -> prune -> fine-tune", FapOptions),
    "paf": ("prune each -> fine-tune each -> fuse -> fine-tune", PipelineOptions),
}
_JOB_COMMANDS = {
    "train": ("train a model from scratch (resumable)", commands.TrainOptions),
    "eval": ("top-1 of a (pruned) checkpoint on the test split", commands.EvalOptions),
    "prune": ("prune groups of a checkpoint (Intra-Fusion/Default)", commands.PruneOptions),
    "finetune": ("fine-tune a (pruned) checkpoint", commands.FinetuneOptions),
    "datafree": (
        "the paper's data-free tables (one group at a time)",
        commands.DatafreeOptions,
    ),
    "demo": (
        "train a small VGG11-BN on CIFAR-10 and run the data-free sweep (~10 min)",
        commands.DemoOptions,
    ),
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``ifjax: error: ...`` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"ifjax: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def _start_distributed(hosts: Hosts) -> None:
    """``jax.distributed.initialize`` with the given flags, before JAX touches a device."""
    if not hosts.distributed:
        return
    import jax

    given = hosts.given()
    try:
        jax.distributed.initialize(**given)
    except (ValueError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"--distributed: jax.distributed.initialize({_arguments(given)}) failed: "
            f"{str(error).rstrip('.')}. "
            "Pass --coordinator-address HOST:PORT, --num-processes N and --process-id I, or "
            "run under a cluster JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU); "
            "see docs/multihost.md"
        ) from error


def _arguments(given: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in given.items())


def parser() -> argparse.ArgumentParser:
    """The ``ifjax`` argument parser, generated from the commands' option dataclasses."""
    main_parser = _Parser(prog="ifjax", description=__doc__.split("\n\n")[0])
    main_parser.add_argument(
        "--compilation-cache",
        help="JAX persistent compilation cache directory, or 'off' "
        "(default $IFJAX_COMPILATION_CACHE or ~/.cache/ifjax/jax)",
    )
    main_parser.add_argument("--traceback", action="store_true", help="show errors' tracebacks")
    subparsers = main_parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, options_class) in _JOB_COMMANDS.items():
        add_options(subparsers.add_parser(name, help=help_), options_class)
    for name, (help_, options_class) in _SPLIT_COMMANDS.items():
        if name != "split-train":
            help_ = f"split-data pipeline: {help_}, vs whole data"
        sub = subparsers.add_parser(name, help=help_)
        add_options(sub, SplitTarget)
        add_options(sub, options_class)
        add_options(sub, Hosts, title="several hosts (see docs/multihost.md)")
    return main_parser


def _report_fit(result: dict[str, Any]) -> None:
    if not result["finished"]:
        print(
            f"stopped after {result['epochs_done']} complete epochs; run the same command "
            f"again to resume from {result['workdir']}/checkpoints"
        )
        return
    print(f"test top-1: {result['test_top1']:.2f}%")
    print(f"model saved to {result['checkpoint']}")


def _run_train(options: commands.TrainOptions) -> None:
    _report_fit(jobs.train(**options.arguments()))


def _run_eval(options: commands.EvalOptions) -> None:
    result = jobs.evaluate_checkpoint(**options.arguments())
    print(
        f"top-1: {result['top1']:.2f}% (loss {result['loss']:.4f}, {result['count']} test "
        f"images of {result['dataset']})"
    )


def _run_prune(options: commands.PruneOptions) -> None:
    result = jobs.prune_checkpoint(**options.arguments())
    changed = ", ".join(f"{k} {a}->{b}" for k, (a, b) in result["widths_changed"].items())
    kept = result["params_after"] / result["params_before"]
    print(
        f"pruned groups {result['groups']} at sparsity {options.sparsity} ({options.method}, "
        f"{options.importance}): {changed}"
    )
    print(f"parameters: {result['params_before']} -> {result['params_after']} ({kept:.1%} kept)")
    if options.evaluate:
        print(
            f"top-1 before: {result['top1_before']:.2f}%  after: {result['top1_after']:.2f}% "
            "(no fine-tuning)"
        )
    print(f"pruned model saved to {result['checkpoint']}")


def _run_finetune(options: commands.FinetuneOptions) -> None:
    _report_fit(jobs.finetune(**options.arguments()))


def _report_datafree(result: dict[str, Any]) -> None:
    print(result["table"])
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")


def _run_datafree(options: commands.DatafreeOptions) -> None:
    _report_datafree(jobs.datafree(**options.arguments()))


def _run_demo(options: commands.DemoOptions) -> None:
    result = jobs.demo(**options.arguments())
    trained = result["train"]
    print(f"\ndata: {trained['data_source']}")
    print(f"base model {trained['checkpoint']}: test top-1: {trained['test_top1']:.2f}%\n")
    _report_datafree(result["datafree"])
    print(f"demo finished in {result['seconds'] / 60:.1f} min")


def _run_split(args: argparse.Namespace) -> None:
    hosts = options_from_args(Hosts, args)
    target = options_from_args(SplitTarget, args)
    options = options_from_args(_SPLIT_COMMANDS[args.command][1], args)
    _start_distributed(hosts)  # first: nothing may touch a device before it
    import jax

    from train import pipelines

    run = {"split-train": pipelines.split_train, "fap": pipelines.fap, "paf": pipelines.paf}
    run[args.command](target.model, target.dataset, **options.arguments())
    if jax.process_index() == 0:
        print(f"report: {options.workdir}/report.md")


_RUNS = {
    "train": _run_train,
    "eval": _run_eval,
    "prune": _run_prune,
    "finetune": _run_finetune,
    "datafree": _run_datafree,
    "demo": _run_demo,
}


def _run(args: argparse.Namespace) -> None:
    if args.command in _SPLIT_COMMANDS:
        _run_split(args)
        return
    _RUNS[args.command](options_from_args(_JOB_COMMANDS[args.command][1], args))


def _configure(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("train").setLevel(logging.INFO)
    cache = args.compilation_cache
    if cache is None:
        jobs.enable_compilation_cache(jobs.default_compilation_cache())
    elif cache.lower() != "off":
        jobs.enable_compilation_cache(cache)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``ifjax`` command line.

    Args:
      argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 2 for bad arguments or input (one line on stderr).
    """
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    _configure(args)
    try:
        _run(args)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        try:
            _fail(str(error) or type(error).__name__)
        except SystemExit as exit_:
            return int(exit_.code)
    return 0
