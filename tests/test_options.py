"""train/options.py: argparse arguments generated from an options dataclass, parsed back
into it, with its defaults, help and validation."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from train.options import (
    POSITIVE_INT,
    SPARSITY,
    Options,
    add_options,
    option,
    options_from_args,
)


def _items(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+"))


@dataclasses.dataclass(frozen=True)
class Run(Options):
    workdir: str = option(None, required=True, recorded="never", help="where it goes")
    epochs: int = option(300, check=POSITIVE_INT, help="training epochs")
    sparsity: float = option(0.5, check=SPARSITY)
    schedule: str = option("base", choices=("base", "fast"))
    subset: int | None = option(None, flag="--train-subset", check=POSITIVE_INT)
    rate: float | None = option(None, flag="--lr")
    kfold: bool = option(False, help="k-fold sets")
    baseline: bool = option(True, flag="--no-baseline")
    resume: bool = option(True, flag="--restart")
    paper: bool | None = option(None)
    sparsities: tuple[float, ...] = option((0.1, 0.2), check=SPARSITY)
    methods: tuple[str, ...] = option(("a",), choices=("a", "b"))
    groups: tuple[int, ...] = option((0,), parse=_items)
    recalibrate: int = option(0, recorded="when_set")
    log: object = option(print, command_line=False, recorded="never")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="test")
    add_options(parser, Run)
    return parser


def _parse(argv: list[str], **given) -> Run:
    return options_from_args(Run, _parser().parse_args(argv), **given)


def test_defaults_are_the_dataclass_defaults():
    assert _parse(["--workdir", "w"]) == Run(workdir="w")


def test_every_kind_of_option_parses():
    argv = ["--workdir", "w", "--epochs", "3", "--sparsity", "0.25", "--schedule", "fast"]
    argv += ["--train-subset", "40", "--lr", "1e-3", "--kfold", "--no-baseline", "--restart"]
    argv += ["--no-paper", "--sparsities", "0.3, 0.6", "--methods", "b,a", "--groups", "2+5"]
    argv += ["--recalibrate", "7"]
    run = _parse(argv, log=None)
    assert run == Run(
        workdir="w",
        epochs=3,
        sparsity=0.25,
        schedule="fast",
        subset=40,
        rate=1e-3,
        kfold=True,
        baseline=False,
        resume=False,
        paper=False,
        sparsities=(0.3, 0.6),
        methods=("b", "a"),
        groups=(2, 5),
        recalibrate=7,
        log=None,
    )
    assert _parse(["--workdir", "w", "--paper"]).paper is True


def test_python_only_options_have_no_argument():
    with pytest.raises(UsageError, match="unrecognized arguments: --log x"):
        _parser().parse_args(["--workdir", "w", "--log", "x"])


def test_help_shows_the_help_text_and_choices(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for expected in ("--workdir WORKDIR where it goes", "training epochs", "{base,fast}"):
        assert expected in help_text
    assert "--no-baseline" in help_text and "--paper, --no-paper" in help_text
    assert "--log" not in help_text


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --workdir"),
        (["--epochs", "0"], "argument --epochs: epochs must be a positive integer, got '0'"),
        (["--epochs", "two"], "argument --epochs: epochs must be a positive integer, got 'two'"),
        (["--sparsity", "1"], "argument --sparsity: sparsity must be in [0, 1), got '1'"),
        (["--schedule", "slow"], "argument --schedule: invalid choice: 'slow'"),
        (["--lr", "fast"], "argument --lr: rate must be a float, got 'fast'"),
        (["--sparsities", "0.1,2"], "argument --sparsities: sparsities must be in [0, 1)"),
        (["--methods", "a,c"], "argument --methods: unknown method 'c'; choose from a, b"),
    ],
)
def test_bad_command_lines_name_the_flag(argv, message):
    with pytest.raises(UsageError) as error:
        _parser().parse_args(["--workdir", "w", *argv] if argv else argv)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(epochs=0), "epochs must be a positive integer, got 0"),
        (dict(sparsity=1.5), "sparsity must be in [0, 1), got 1.5"),
        (dict(schedule="slow"), "schedule: unknown value 'slow'; choose from ('base', 'fast')"),
        (dict(sparsities=(0.1, -0.1)), "sparsities must be in [0, 1), got -0.1"),
        (dict(methods=("c",)), "methods: unknown value 'c'"),
        (dict(subset=0), "subset must be a positive integer, got 0"),
    ],
)
def test_bad_values_raise_a_value_error_naming_the_option(given, message):
    with pytest.raises(ValueError) as error:
        Run(workdir="w", **given)
    assert message in str(error.value)


def test_settings_leave_out_what_is_not_recorded():
    settings = Run(workdir="w").settings()
    assert "workdir" not in settings and "log" not in settings
    assert "recalibrate" not in settings and settings["epochs"] == 300
    assert Run(workdir="w", recalibrate=5).settings()["recalibrate"] == 5
    assert Run(workdir="w").arguments()["workdir"] == "w"


def test_an_option_without_a_command_line_form_is_named():
    @dataclasses.dataclass(frozen=True)
    class Odd(Options):
        table: dict = option(None)

    with pytest.raises(TypeError, match="option table: no command-line form"):
        add_options(argparse.ArgumentParser(), Odd)
