"""Command-line arguments generated from a pydantic model: one flag per field, with the field's type,
default and description, so the CLI cannot drift from the flow's parameters.

    --field-name VALUE        str, int, float (type-checked by the model, errors name the flag)
    --flag / --no-flag        bool
    --mode {copy,reference}   Literal choices
    --split 0.6,0.1,0.3       tuple/list: comma separated
    --set K=V (repeatable)    dict
    --nima-model-version V    a nested model's fields, prefixed with the outer field's name

Only values given on the command line reach the model; every default is the model's own.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class Alias:
    """An extra flag that sets one or more fields (``--seed`` sets two seeds, ``--reference`` sets
    ``mode``), kept so that older command lines still work."""

    flag: str
    fields: tuple[str, ...]
    help: str
    const: Any = None  # the value a bare flag sets; None: the flag takes a value like the field's


@dataclass(frozen=True)
class CliSpec:
    """Where a field's flag is not ``--field-name``: positionals, renamed flags, aliases."""

    positional: tuple[str, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)  # "field" or "outer.inner" -> "--flag"
    aliases: tuple[Alias, ...] = ()
    filled: tuple[str, ...] = ()  # required fields that the model fills when absent (not required here)


class HelpFormatter(argparse.HelpFormatter):
    """Wrap help without breaking words at hyphens or inside URLs."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = inspect.cleandoc(text).split("\n\n")
        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                         subsequent_indent=indent, break_on_hyphens=False,
                                         break_long_words=False) for p in paragraphs)


def _dest(path: str) -> str:
    return path.replace(".", "__")


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got {text!r}")
    return key.strip(), value


def _comma_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _kind(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field type."""
    plain = _plain(annotation)
    origin = typing.get_origin(plain)
    if plain is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = typing.get_args(plain)
        return {"choices": choices, "type": type(choices[0])}
    if origin in (dict, Mapping):
        return {"action": "append", "type": _key_value, "metavar": "KEY=VALUE"}
    if origin in (list, tuple):
        return {"type": _comma_list, "metavar": "A,B,..."}
    if plain in (int, float):
        return {"type": plain}
    return {"type": str}


def _help(info: FieldInfo, extra: str = "") -> str:
    text = (info.description or "") + extra
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        if default not in (None, {}, []):
            shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else default
            text += f" (default: {shown})"
    return text.replace("%", "%%")


def flag_names(model: type[BaseModel], spec: CliSpec = CliSpec(), prefix: str = "") -> dict[str, str]:
    """Every field path (``"nima.model_version"``) -> its flag (or positional name)."""
    names = {}
    for name, info in model.model_fields.items():
        path = prefix + name
        if _is_model(_plain(info.annotation)):
            names.update(flag_names(_plain(info.annotation), spec, path + "."))
        elif path in spec.positional:
            names[path] = name
        else:
            names[path] = spec.flags.get(path, "--" + path.replace(".", "-").replace("_", "-"))
    return names


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], spec: CliSpec = CliSpec(),
                        prefix: str = "") -> None:
    """One argument per field of ``model`` (recursing into nested models), then ``spec``'s aliases."""
    flags = flag_names(model, spec, prefix)
    for name, info in model.model_fields.items():
        path = prefix + name
        if _is_model(_plain(info.annotation)):
            group = parser.add_argument_group(f"{name} ({info.description})")
            add_model_arguments(group, _plain(info.annotation), spec, path + ".")  # type: ignore[arg-type]
            continue
        kind = _kind(info.annotation)
        if path in spec.positional:
            parser.add_argument(_dest(path), help=_help(info), **kind)
            continue
        if "metavar" not in kind and "choices" not in kind:
            kind["metavar"] = name.upper()
        parser.add_argument(flags[path], dest=_dest(path), default=argparse.SUPPRESS,
                            required=info.is_required() and path not in spec.filled, help=_help(info), **kind)
    if not prefix:
        for alias in spec.aliases:
            keywords = ({"action": "store_const", "const": alias.const} if alias.const is not None
                        else {"metavar": alias.flag.lstrip("-").upper(),
                              **_kind(model.model_fields[alias.fields[0]].annotation)})
            parser.add_argument(alias.flag, dest="alias__" + alias.flag.lstrip("-").replace("-", "_"),
                                default=argparse.SUPPRESS, help=alias.help.replace("%", "%%"), **keywords)


def model_values(args: argparse.Namespace, model: type[BaseModel], spec: CliSpec = CliSpec()) -> dict[str, Any]:
    """The values given on the command line, shaped as ``model`` takes them (nested dicts)."""
    given = vars(args)
    values: dict[str, Any] = {}
    for alias in spec.aliases:
        key = "alias__" + alias.flag.lstrip("-").replace("-", "_")
        if key in given:
            for name in alias.fields:
                values[name] = given[key]
    for path in flag_names(model, spec):
        if _dest(path) not in given:
            continue
        value = given[_dest(path)]
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # KEY=VALUE pairs
            value = dict(value)
        target = values
        *outer, last = path.split(".")
        for part in outer:
            target = target.setdefault(part, {})
        target[last] = value
    return values


def describe_validation_error(error: ValidationError, flags: Mapping[str, str]) -> str:
    """One line naming the flag of each bad value: ``--n-patches: Input should be ...``."""
    parts = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        where = flags.get(path, path) or "arguments"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)
