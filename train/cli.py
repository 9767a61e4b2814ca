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
or ``off``, or ``$IFJAX_COMPILATION_CACHE``). The work itself is in :mod:`train.jobs`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ifjax
from ifjax import GraphError
from train import jobs, sweep
from train.data import DatasetUnavailableError
from train.training import OPTIMIZERS, SCHEDULES

__all__ = ["main", "parser"]

MODELS = ("vgg11_bn", "resnet18", "resnet50", "vit", "mobilenetv2")
DATASETS = ("cifar10", "cifar10_jpeg", "cifar100", "imagenet2012")
METHODS = ("intra_fusion", "default")
# Errors that mean "bad input", reported in one line; anything else is a bug: traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, DatasetUnavailableError, GraphError)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``ifjax: error: ...`` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"ifjax: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def _number(kind: Callable[[str], Any], check: Callable[[Any], bool], what: str):
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value

    return parse


_sparsity = _number(float, lambda s: 0 <= s < 1, "sparsity must be in [0, 1)")
_positive_int = _number(int, lambda n: n > 0, "must be a positive integer")
_positive_float = _number(float, lambda x: x > 0, "must be a positive number")
_nonnegative_int = _number(int, lambda n: n >= 0, "must be a non-negative integer")
_nonnegative_float = _number(float, lambda x: x >= 0, "must be a non-negative number")


def _list_of(parse: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [parse(item.strip()) for item in text.split(",") if item.strip()]


def _choices(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def check(name: str) -> str:
        if name not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {name!r}; choose from {', '.join(allowed)}"
            )
        return name

    return _list_of(check)


def _groups(text: str) -> str | list[int]:
    if text == "all" or text in ifjax.GROUP_KINDS:
        return text
    message = f"groups must be 'all', a kind ({', '.join(ifjax.GROUP_KINDS)}) or indices like 0,3"
    index = _number(int, lambda i: i >= 0, message)
    return _list_of(index)(text)


def _data_options(sub: argparse.ArgumentParser, dataset_default: str | None = None) -> None:
    help_dataset = "dataset (default: the checkpoint's)" if dataset_default is None else "dataset"
    sub.add_argument("--dataset", choices=DATASETS, default=dataset_default, help=help_dataset)
    sub.add_argument("--data-dir", help="tfds data dir (default $IFJAX_DATA_DIR, ...)")
    sub.add_argument("--zip-path", help="the offline CIFAR-10 JPEG zip (found automatically)")


def _fit_options(sub: argparse.ArgumentParser, epochs: int, schedule: str) -> None:
    sub.add_argument("--workdir", required=True, help="checkpoints, metrics and workdir/model")
    sub.add_argument("--epochs", type=_positive_int, default=epochs)
    sub.add_argument("--batch-size", type=_positive_int, default=128)
    sub.add_argument("--schedule", choices=SCHEDULES, default=schedule)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--train-subset", type=_positive_int, help="random subset of training images")
    sub.add_argument("--max-steps", type=_positive_int, help="stop (resumably) after this step")
    sub.add_argument("--checkpoint-every", type=_positive_int, help="also checkpoint every N steps")
    sub.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="default sgd")
    sub.add_argument("--lr", type=_positive_float, help="peak learning rate (default: schedule's)")
    sub.add_argument("--weight-decay", type=_nonnegative_float, help="default 5e-4")


def _add_train(commands) -> None:
    sub = commands.add_parser("train", help="train a model from scratch (resumable)")
    sub.add_argument("--model", choices=MODELS, required=True)
    sub.add_argument("--width-multiplier", type=_positive_float, default=1.0)
    _fit_options(sub, epochs=300, schedule="base")
    _data_options(sub, dataset_default="cifar10")


def _add_eval(commands) -> None:
    sub = commands.add_parser("eval", help="top-1 of a (pruned) checkpoint on the test split")
    sub.add_argument("--checkpoint", required=True)
    sub.add_argument("--test-subset", type=_positive_int, help="random subset of test images")
    _data_options(sub)


def _intra_fusion_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--solver", choices=("exact", "sinkhorn"), default="exact")
    sub.add_argument("--epsilon", type=_positive_float, default=1e-3, help="Sinkhorn (relative)")


def _add_prune(commands) -> None:
    sub = commands.add_parser("prune", help="prune groups of a checkpoint (Intra-Fusion/Default)")
    sub.add_argument("--checkpoint", required=True)
    sub.add_argument("--out", required=True, help="where the pruned checkpoint goes")
    sub.add_argument(
        "--groups",
        type=_groups,
        default="all",
        help="'all' (not a residual stream), a kind (heads, neurons, ...) or indices, e.g. 0,3",
    )
    sub.add_argument("--sparsity", type=_sparsity, required=True)
    sub.add_argument("--method", choices=METHODS, default="intra_fusion")
    sub.add_argument("--importance", choices=ifjax.IMPORTANCES, default="l1")
    sub.add_argument("--marginals", choices=("uniform", "importance"), default="uniform")
    sub.add_argument("--target", choices=("most_important", "centroids"), default="most_important")
    sub.add_argument(
        "--map-normalization", choices=("reference", "row_average"), default="reference"
    )
    _intra_fusion_options(sub)
    sub.add_argument(
        "--round-to",
        type=_positive_int,
        default=1,
        help="keep a multiple of this many channels per group (e.g. 8 for accelerators)",
    )
    sub.add_argument(
        "--recalibrate",
        type=int,
        default=0,
        metavar="N",
        help="re-estimate BatchNorm statistics on N training images after pruning (0: no)",
    )
    sub.add_argument("--evaluate", action="store_true", help="print top-1 before and after")
    sub.add_argument("--seed", type=int, default=0, help="key of 'random' importance")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _data_options(sub)


def _add_finetune(commands) -> None:
    sub = commands.add_parser("finetune", help="fine-tune a (pruned) checkpoint")
    sub.add_argument("--checkpoint", required=True)
    _fit_options(sub, epochs=10, schedule="finetune")
    _data_options(sub)


def _add_datafree(commands) -> None:
    sub = commands.add_parser("datafree", help="the paper's data-free tables (one group at a time)")
    sub.add_argument("--checkpoint", required=True)
    sub.add_argument("--out", required=True, help="directory for the CSV, markdown and plots")
    sub.add_argument("--groups", type=_groups, default="all")
    sub.add_argument(
        "--sparsities", type=_list_of(_sparsity), default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    )
    sub.add_argument(
        "--importances",
        type=_choices(ifjax.IMPORTANCES, "importance"),
        default=["l1", "lamp", "taylor"],
    )
    sub.add_argument(
        "--methods",
        type=_choices(tuple(sweep.METHOD_VARIANTS), "method"),
        default=["default", "intra_fusion"],
        help="comma-separated: default, intra_fusion (with --solver), intra_fusion_sinkhorn, "
        "intra_fusion_row_average",
    )
    _intra_fusion_options(sub)
    sub.add_argument(
        "--paper-lamp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score 'lamp' with the released code's LAMP (lamp_released), as the paper's "
        "numbers were; default: on when the paper's numbers are there to compare with",
    )
    sub.add_argument("--test-subset", type=_positive_int, help="random subset of test images")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument(
        "--restart", action="store_true", help="ignore the cells finished in --out/datafree.jsonl"
    )
    _data_options(sub)


def _add_demo(commands) -> None:
    sub = commands.add_parser(
        "demo", help="train a small VGG11-BN on CIFAR-10 and run the data-free sweep (~10 min)"
    )
    sub.add_argument("--workdir", default="runs/demo", help="default runs/demo")
    demo = jobs.DEMO
    default = lambda name: f"default {demo[name]}"
    sub.add_argument("--width-multiplier", type=_positive_float, help=default("width_multiplier"))
    sub.add_argument("--epochs", type=_positive_int, help=default("epochs"))
    sub.add_argument("--train-subset", type=_positive_int, help="default: all training images")
    sub.add_argument("--test-subset", type=_positive_int, help="default: all test images")
    sub.add_argument("--sparsities", type=_list_of(_sparsity), help=default("sparsities"))
    sub.add_argument(
        "--importances", type=_choices(ifjax.IMPORTANCES, "importance"), help=default("importances")
    )
    sub.add_argument("--data-dir")
    sub.add_argument("--zip-path")


def _split_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", choices=MODELS, default="vgg11_bn")
    sub.add_argument("--dataset", choices=DATASETS, default="cifar10")
    sub.add_argument("--data-dir", help="tfds data dir (default $IFJAX_DATA_DIR, ...)")
    sub.add_argument("--width-multiplier", type=_positive_float, default=1.0)
    sub.add_argument("--k", type=_positive_int, default=2, help="number of disjoint splits")
    sub.add_argument("--kfold", action="store_true", help="train the C(k, k/2) k-fold sets")
    sub.add_argument("--epochs", type=_positive_int, default=300, help="replica training epochs")
    sub.add_argument("--batch-size", type=_positive_int, default=128)
    sub.add_argument("--schedule", choices=SCHEDULES, default="base")
    sub.add_argument("--num-devices", type=_positive_int, help="devices for the replica axis")
    sub.add_argument("--steps-per-epoch", type=_positive_int, help="cap (quick runs)")
    sub.add_argument("--train-subset", type=_positive_int, help="random subset of training images")
    sub.add_argument("--test-subset", type=_positive_int, help="random subset of test images")
    sub.add_argument(
        "--workdir", required=True, help="report.{json,csv,md}, models and finished stages"
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a workdir that holds a run with other settings (default: "
        "resume a run with the same settings, refuse other settings)",
    )
    sub.add_argument("--seed", type=int, default=0)
    hosts = sub.add_argument_group("several hosts (see docs/multihost.md)")
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first; run the same command on every host",
    )
    hosts.add_argument(
        "--coordinator-address",
        help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS or what JAX "
        "detects on SLURM, Open MPI, Kubernetes, Cloud TPU)",
    )
    hosts.add_argument("--num-processes", type=_positive_int, help="default: detected")
    hosts.add_argument("--process-id", type=_nonnegative_int, help="0..N-1; default: detected")


def _start_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` with the given flags, before JAX touches a device."""
    given = {
        name: getattr(args, name)
        for name in ("coordinator_address", "num_processes", "process_id")
        if getattr(args, name) is not None
    }
    if not args.distributed:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} given without --distributed")
        return
    if given.get("process_id", -1) >= given.get("num_processes", sys.maxsize):
        raise ValueError(
            f"--process-id must be below --num-processes ({given['num_processes']}), "
            f"got {given['process_id']}"
        )
    import jax

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


def _add_split(commands) -> None:
    sub = commands.add_parser("split-train", help="train k replicas on disjoint splits at once")
    _split_options(sub)
    for name, help_ in (
        ("fap", "fuse -> fine-tune -> prune -> fine-tune"),
        ("paf", "prune each -> fine-tune each -> fuse -> fine-tune"),
    ):
        sub = commands.add_parser(name, help=f"split-data pipeline: {help_}, vs whole data")
        _split_options(sub)
        sub.add_argument("--sparsity", type=_sparsity, default=0.6, help="final, all groups")
        sub.add_argument("--prune-steps", type=_positive_int, default=4)
        sub.add_argument("--epochs-per-step", type=_positive_int, default=10)
        sub.add_argument("--finetune-epochs", type=_positive_int, default=80)
        sub.add_argument("--importance", choices=ifjax.IMPORTANCES, default="l1")
        sub.add_argument("--fusion-method", choices=ifjax.FUSION_METHODS, default="activation")
        sub.add_argument("--fusion-solver", choices=("exact", "sinkhorn"), default="exact")
        sub.add_argument("--no-baseline", action="store_true", help="skip the whole-data model")


def parser() -> argparse.ArgumentParser:
    """The ``ifjax`` argument parser."""
    main_parser = _Parser(prog="ifjax", description=__doc__.split("\n\n")[0])
    main_parser.add_argument(
        "--compilation-cache",
        help="JAX persistent compilation cache directory, or 'off' "
        "(default $IFJAX_COMPILATION_CACHE or ~/.cache/ifjax/jax)",
    )
    main_parser.add_argument("--traceback", action="store_true", help="show errors' tracebacks")
    commands = main_parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    adders = (_add_train, _add_eval, _add_prune, _add_finetune, _add_datafree, _add_demo)
    for add in (*adders, _add_split):
        add(commands)
    return main_parser


def _data(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dataset=args.dataset, data_dir=args.data_dir, zip_path=args.zip_path)


def _fit(args: argparse.Namespace) -> dict[str, Any]:
    names = ("workdir", "epochs", "batch_size", "schedule", "seed", "train_subset", "max_steps")
    return {name: getattr(args, name) for name in names} | {
        "checkpoint_every": args.checkpoint_every,
        "optimizer": args.optimizer,
        "peak_lr": args.lr,
        "weight_decay": args.weight_decay,
    }


def _report_fit(result: dict[str, Any]) -> None:
    if not result["finished"]:
        print(
            f"stopped after {result['epochs_done']} complete epochs; run the same command "
            f"again to resume from {result['workdir']}/checkpoints"
        )
        return
    print(f"test top-1: {result['test_top1']:.2f}%")
    print(f"model saved to {result['checkpoint']}")


def _run_train(args: argparse.Namespace) -> None:
    _report_fit(
        jobs.train(
            model=args.model, width_multiplier=args.width_multiplier, **_data(args), **_fit(args)
        )
    )


def _run_eval(args: argparse.Namespace) -> None:
    result = jobs.evaluate_checkpoint(args.checkpoint, test_subset=args.test_subset, **_data(args))
    print(
        f"top-1: {result['top1']:.2f}% (loss {result['loss']:.4f}, {result['count']} test "
        f"images of {result['dataset']})"
    )


def _run_prune(args: argparse.Namespace) -> None:
    names = ("marginals", "target", "solver", "epsilon", "map_normalization")
    result = jobs.prune_checkpoint(
        args.checkpoint,
        args.out,
        groups=args.groups,
        sparsity=args.sparsity,
        method=args.method,
        importance=args.importance,
        options={name: getattr(args, name) for name in names},
        round_to=args.round_to,
        recalibrate=args.recalibrate,
        evaluate=args.evaluate,
        seed=args.seed,
        overwrite=args.overwrite,
        **_data(args),
    )
    changed = ", ".join(f"{k} {a}->{b}" for k, (a, b) in result["widths_changed"].items())
    kept = result["params_after"] / result["params_before"]
    print(
        f"pruned groups {result['groups']} at sparsity {args.sparsity} ({args.method}, "
        f"{args.importance}): {changed}"
    )
    print(f"parameters: {result['params_before']} -> {result['params_after']} ({kept:.1%} kept)")
    if args.evaluate:
        print(
            f"top-1 before: {result['top1_before']:.2f}%  after: {result['top1_after']:.2f}% "
            "(no fine-tuning)"
        )
    print(f"pruned model saved to {result['checkpoint']}")


def _run_finetune(args: argparse.Namespace) -> None:
    _report_fit(jobs.finetune(args.checkpoint, **_data(args), **_fit(args)))


def _report_datafree(result: dict[str, Any]) -> None:
    print(result["table"])
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")


def _run_datafree(args: argparse.Namespace) -> None:
    result = jobs.datafree(
        args.checkpoint,
        args.out,
        groups=args.groups,
        sparsities=args.sparsities,
        importances=args.importances,
        methods=args.methods,
        solver=args.solver,
        epsilon=args.epsilon,
        paper_lamp=args.paper_lamp,
        test_subset=args.test_subset,
        seed=args.seed,
        resume=not args.restart,
        **_data(args),
    )
    _report_datafree(result)


def _run_demo(args: argparse.Namespace) -> None:
    names = ("width_multiplier", "epochs", "train_subset", "test_subset", "sparsities")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.importances is not None:
        overrides["importances"] = tuple(args.importances)
    result = jobs.demo(args.workdir, data_dir=args.data_dir, zip_path=args.zip_path, **overrides)
    trained = result["train"]
    print(f"\ndata: {trained['data_source']}")
    print(f"base model {trained['checkpoint']}: test top-1: {trained['test_top1']:.2f}%\n")
    _report_datafree(result["datafree"])
    print(f"demo finished in {result['seconds'] / 60:.1f} min")


def _run_split(args: argparse.Namespace) -> None:
    _start_distributed(args)  # first: nothing may touch a device before it
    import jax

    from train import pipelines

    common = dict(
        width_multiplier=args.width_multiplier, k=args.k, kfold=args.kfold, epochs=args.epochs,
        batch_size=args.batch_size, optimizer_kind=args.schedule, num_devices=args.num_devices,
        steps_per_epoch=args.steps_per_epoch, train_examples=args.train_subset,
        test_examples=args.test_subset, data_dir=args.data_dir, workdir=args.workdir,
        overwrite=args.overwrite, seed=args.seed,
    )  # fmt: skip
    if args.command != "split-train":
        common |= dict(
            sparsity=args.sparsity, prune_steps=args.prune_steps,
            epochs_per_step=args.epochs_per_step, finetune_epochs=args.finetune_epochs,
            importance=args.importance, fusion_method=args.fusion_method,
            fusion_solver=args.fusion_solver, baseline=not args.no_baseline,
        )  # fmt: skip
    run = {"split-train": pipelines.split_train, "fap": pipelines.fap, "paf": pipelines.paf}
    run[args.command](args.model, args.dataset, **common)
    if jax.process_index() == 0:
        print(f"report: {args.workdir}/report.md")


_COMMANDS = {
    "split-train": _run_split,
    "fap": _run_split,
    "paf": _run_split,
    "train": _run_train,
    "eval": _run_eval,
    "prune": _run_prune,
    "finetune": _run_finetune,
    "datafree": _run_datafree,
    "demo": _run_demo,
}


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
        _COMMANDS[args.command](args)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        try:
            _fail(str(error) or type(error).__name__)
        except SystemExit as exit_:
            return int(exit_.code)
    return 0
