"""Command options defined once: one dataclass per command, argparse generated from it.

A command's options are the fields of a frozen dataclass deriving from :class:`Options`;
each field holds its default and, in :func:`option`, its help text, its choices and a
:class:`Check` of its values. :func:`add_options` turns the fields into ``argparse``
arguments, :func:`options_from_args` turns the parsed namespace back into the dataclass,
and the dataclass validates itself (a ValueError naming the bad option), so the command
line, the Python API and scripts share one definition.

How a field becomes an argument (``--name-with-dashes``, or ``flag=``):

* ``bool`` with default False: ``--flag`` sets it; default True: ``--no-flag`` (or the
  given ``flag``) clears it; ``bool | None``: ``--flag`` / ``--no-flag``.
* ``int``, ``float``, ``str`` (optionally ``| None``): one value, checked as it is parsed.
* ``tuple[T, ...]``: one comma-separated value (``--sparsities 0.1,0.3``), each item
  checked and, with ``choices``, one of them.
* ``parse=``: a function ``str -> value`` for anything else (e.g. ``"all"`` or indices).
* ``command_line=False``: Python-only (callbacks, settings the command line leaves fixed).

Example::

    @dataclasses.dataclass(frozen=True)
    class Run(Options):
        epochs: int = option(300, help="training epochs", check=POSITIVE_INT)
        schedule: str = option("base", choices=("base", "fast"))

    add_options(parser, Run)
    run = options_from_args(Run, parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "FRACTION",
    "NONNEGATIVE_FLOAT",
    "NONNEGATIVE_INT",
    "POSITIVE_FLOAT",
    "POSITIVE_INT",
    "SPARSITY",
    "Check",
    "Options",
    "add_options",
    "option",
    "options_from_args",
]


@dataclasses.dataclass(frozen=True)
class Check:
    """A condition on an option's value (each item of a tuple), e.g. ``must be >= 0``."""

    test: Callable[[Any], bool]
    message: str


POSITIVE_INT = Check(lambda n: n > 0, "must be a positive integer")
POSITIVE_FLOAT = Check(lambda x: x > 0, "must be a positive number")
NONNEGATIVE_INT = Check(lambda n: n >= 0, "must be a non-negative integer")
NONNEGATIVE_FLOAT = Check(lambda x: x >= 0, "must be a non-negative number")
FRACTION = Check(lambda x: 0 <= x < 1, "must be in [0, 1)")
SPARSITY = FRACTION


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,  # noqa: A002 (argparse's name)
    choices: Sequence[Any] | None = None,
    check: Check | None = None,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    required: bool = False,
    metavar: str | None = None,
    command_line: bool = True,
    recorded: str = "always",
) -> Any:
    """A dataclass field of an :class:`Options` class, with what its argument needs.

    Args:
      default: the default (omitted: the option is required).
      help: the ``--help`` text.
      choices: the allowed values (of every item, for a tuple).
      check: a condition on the value (on every item, for a tuple); None is never checked.
      flag: the command-line flag, when not ``--`` plus the name with dashes.
      parse: turns the command-line text into the value (instead of the field's type).
      required: required on the command line although Python has a default.
      metavar: the value's name in ``--help``.
      command_line: False: a Python-only option (no argument).
      recorded: for :meth:`Options.settings`: "always", "never" or "when_set" (only
        when truthy, so that results recorded before the option existed still match).
    """
    if recorded not in ("always", "never", "when_set"):
        raise ValueError(f"recorded must be 'always', 'never' or 'when_set', got {recorded!r}")
    metadata = dict(
        help=help,
        choices=None if choices is None else tuple(choices),
        check=check,
        flag=flag,
        parse=parse,
        required=required,
        metavar=metavar,
        command_line=command_line,
        recorded=recorded,
    )
    return dataclasses.field(default=default, metadata=metadata)


def _meta(field: dataclasses.Field, key: str, default: Any = None) -> Any:
    return field.metadata.get(key, default)


@dataclasses.dataclass(frozen=True)
class Options:
    """Base class of a command's options: checks every field's value on construction."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _validate(field, type(self), getattr(self, field.name))

    def arguments(self) -> dict[str, Any]:
        """Every field by name (shallow), e.g. the keyword arguments of a job."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def settings(self) -> dict[str, Any]:
        """The options that describe a run (see ``recorded`` of :func:`option`)."""
        out = {}
        for field in dataclasses.fields(self):
            value, recorded = getattr(self, field.name), _meta(field, "recorded", "always")
            if recorded == "always" or (recorded == "when_set" and value):
                out[field.name] = value
        return out


def _validate(field: dataclasses.Field, owner: type, value: Any) -> None:
    is_list = isinstance(value, (tuple, list)) and _item_type(field, owner) is not None
    items = value if is_list else (value,)
    choices, check = _meta(field, "choices"), _meta(field, "check")
    for item in items:
        if item is None:
            continue
        if choices is not None and item not in choices:
            raise ValueError(f"{field.name}: unknown value {item!r}; choose from {choices}")
        if check is not None and not check.test(item):
            raise ValueError(f"{field.name} {check.message}, got {item!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(field: dataclasses.Field, owner: type) -> Any:
    hint = _hints(owner)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if bool in args:
            return bool
        for scalar in (int, float, str):
            if scalar in args:
                return scalar
        return args[0]
    return hint


def _item_type(field: dataclasses.Field, owner: type) -> Any:
    """The item type of a ``tuple[T, ...]`` field (None for other fields)."""
    hint = _field_type(field, owner)
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0]
    return None


def _flag(field: dataclasses.Field) -> str:
    return _meta(field, "flag") or "--" + field.name.replace("_", "-")


def _checked(kind: Callable[[str], Any], field: dataclasses.Field) -> Callable[[str], Any]:
    """``kind(text)``, then the field's check; argparse names the flag on failure."""
    check, label = _meta(field, "check"), field.name.replace("_", " ")

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = f"{label} {check.message}" if check else f"{label} must be a {kind.__name__}"
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if check is not None and not check.test(value):
            raise argparse.ArgumentTypeError(f"{label} {check.message}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse's fallback message names the type
    return parse


def _comma_list(item: Callable[[str], Any], field: dataclasses.Field) -> Callable[[str], tuple]:
    choices, label = _meta(field, "choices"), field.name.rstrip("s").replace("_", " ")

    def parse(text: str) -> tuple:
        values = tuple(item(part.strip()) for part in text.split(",") if part.strip())
        for value in values:
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown {label} {value!r}; choose from {', '.join(map(str, choices))}"
                )
        return values

    return parse


def _argument(field: dataclasses.Field, owner: type) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` flags and keywords of a field."""
    kind = _field_type(field, owner)
    has_default = field.default is not dataclasses.MISSING
    default = field.default if has_default else None
    required = _meta(field, "required") or not has_default
    keywords: dict[str, Any] = dict(dest=field.name, help=_meta(field, "help"))
    flag = _flag(field)
    if kind is bool:
        if default is None:
            keywords |= dict(action=argparse.BooleanOptionalAction, default=None)
        elif default:
            flag = _meta(field, "flag") or "--no-" + field.name.replace("_", "-")
            keywords |= dict(action="store_false", default=True)
        else:
            keywords |= dict(action="store_true", default=False)
        return [flag], keywords
    keywords |= dict(default=default, metavar=_meta(field, "metavar"))
    if required:
        keywords["required"] = True
    if _meta(field, "parse") is not None:
        keywords["type"] = _meta(field, "parse")
    elif _item_type(field, owner) is not None:
        item = _item_type(field, owner)
        keywords["type"] = _comma_list(_checked(item, field) if item is not str else str, field)
    else:
        if kind not in (int, float, str):
            raise TypeError(f"option {field.name}: no command-line form for {kind}; pass parse=")
        keywords["type"] = _checked(kind, field) if kind is not str else str
        keywords["choices"] = _meta(field, "choices")
    return [flag], keywords


def _command_fields(options_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(options_class) if _meta(f, "command_line", True)]


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    options_class: type,
    *,
    title: str | None = None,
) -> None:
    """Adds an argument for every command-line field of ``options_class`` (in field order).

    Args:
      parser: the (sub)parser.
      options_class: a dataclass whose fields come from :func:`option`.
      title: put the arguments in an argument group of that title.
    """
    target = parser.add_argument_group(title) if title else parser
    for field in _command_fields(options_class):
        flags, keywords = _argument(field, options_class)
        target.add_argument(*flags, **keywords)


def options_from_args(options_class: type, namespace: argparse.Namespace, **given: Any) -> Any:
    """``options_class`` from parsed arguments; ``given`` sets Python-only fields.

    Raises:
      ValueError: naming an option whose value is not allowed.
    """
    values = {f.name: getattr(namespace, f.name) for f in _command_fields(options_class)}
    return options_class(**values, **given)
