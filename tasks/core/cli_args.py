"""Command-line arguments generated from a pydantic model: one flag per field, with the field's type,
default and description, so the CLI cannot drift from the flow's parameters. A stdlib dataclass (its
field's ``metadata["description"]``) works too, for a command that must start without pydantic
(``mpemd sql``: argparse already types each of its values, so there is nothing left to validate).

    --field-name VALUE        str, int, float (type-checked by the model, errors name the flag)
    --flag / --no-flag        bool
    --mode {copy,reference}   Literal choices
    --split 0.6,0.1,0.3       tuple/list: comma separated
    --set K=V (repeatable)    dict, or a nested model named in ``CliSpec.flags``
    --nima-model-version V    a nested model's fields, prefixed with the outer field's name
    --epochs 5                ... or not prefixed (``CliSpec.flatten``)

Only values given on the command line reach the model; every default is the model's own. Values are
checked by the model, not by argparse, so an error names the flag, the value and what it wants
(``describe_validation_error``); argparse's own errors are one line too (``Parser``).
``command_line`` writes a model back as the command line that makes it. No Prefect, no torch:
``python -m tasks.training`` (tasks/, under torchrun) uses it as the ``mpemd`` CLI does.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import shlex
import sys
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar

from tasks.core.cli_values import parse_key_value

if TYPE_CHECKING:  # pydantic loads with the models that need it, not with this module (mpemd sql)
    from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT")


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
    flatten: tuple[str, ...] = ()  # nested models whose fields get flags without the outer name
    # fields naming something that must exist before the command runs -> what the error calls it
    inputs: Mapping[str, str] = field(default_factory=dict)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mpemd: error: ...; see `mpemd score --help``` (the command's
    own help, not the top level's), exit 2, and a misspelt option or command named with its nearest
    spelling instead of a missing-argument error."""

    def error(self, message: str) -> NoReturn:
        choice = re.match(r"argument \S+: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice and self._subparsers is not None:
            message = "unknown command " + choice[1] + _did_you_mean(choice[1], re.findall(r"'([^']*)'", choice[2]))
        name = self.prog if self.prog.startswith("python") else self.prog.split()[0]  # mpemd score -> mpemd
        self.exit(2, f"{name}: error: {message}; see `{self.prog} --help`\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._subparsers is None:  # a command's parser: its options are all known here
            words = list(sys.argv[1:] if args is None else args)
            for word in words[: words.index("--") if "--" in words else len(words)]:
                self._check_option(word)
        return super().parse_known_args(args, namespace)

    def _check_option(self, word: str) -> None:
        if not word.startswith("--") or len(word) < 3:
            return
        name = word.split("=", 1)[0]
        known = [o for o in self._option_string_actions if o.startswith("--")]
        if name not in known and not any(o.startswith(name) for o in known):  # argparse takes prefixes
            self.error(f"unknown option {name}" + _did_you_mean(name, known))


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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
    """A nested pydantic model (none exists before pydantic is loaded)."""
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)


@dataclass(frozen=True)
class _DataclassField:
    """A dataclass field seen as a pydantic ``FieldInfo``: what the flags are made from."""

    annotation: Any
    description: str | None
    default: Any
    default_factory: Any

    def is_required(self) -> bool:
        return self.default is dataclasses.MISSING and self.default_factory is dataclasses.MISSING

    def get_default(self, call_default_factory: bool = False) -> Any:
        if self.default_factory is not dataclasses.MISSING:
            return self.default_factory() if call_default_factory else None
        return None if self.default is dataclasses.MISSING else self.default


def model_fields(model: type) -> Mapping[str, Any]:
    """A pydantic model's ``model_fields``, or a dataclass's fields in their shape."""
    if not dataclasses.is_dataclass(model):
        return model.model_fields  # type: ignore[attr-defined]
    hints = typing.get_type_hints(model)
    return {f.name: _DataclassField(hints[f.name], f.metadata.get("description"), f.default, f.default_factory)
            for f in dataclasses.fields(model)}


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
        return {"action": "append", "type": parse_key_value, "metavar": "KEY=VALUE"}
    if origin in (list, tuple):
        return {"type": _comma_list, "metavar": "A,B,..."}
    return {"type": str}  # numbers too: the model converts them, and its error names flag and value


def _help(info: Any, extra: str = "") -> str:
    text = (info.description or "") + extra
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        if default not in (None, {}, []):
            shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else default
            text += f" (default: {shown})"
    return text.replace("%", "%%")


def _flag(path: str, spec: CliSpec) -> str:
    if path in spec.flags:
        return spec.flags[path]
    outer, _, name = path.rpartition(".")
    return "--" + (name if outer in spec.flatten else path).replace(".", "-").replace("_", "-")


def flag_names(model: type, spec: CliSpec = CliSpec(), prefix: str = "") -> dict[str, str]:
    """Every field path (``"nima.model_version"``) -> its flag (or positional name)."""
    names = {}
    for name, info in model_fields(model).items():
        path = prefix + name
        if _is_model(_plain(info.annotation)):
            names.update(flag_names(_plain(info.annotation), spec, path + "."))
        else:
            names[path] = name if path in spec.positional else _flag(path, spec)
    return names


def add_model_arguments(parser: argparse.ArgumentParser, model: type, spec: CliSpec = CliSpec(),
                        prefix: str = "") -> None:
    """One argument per field of ``model`` (recursing into nested models), then ``spec``'s aliases."""
    flags = flag_names(model, spec, prefix)
    for name, info in model_fields(model).items():
        path = prefix + name
        if _is_model(_plain(info.annotation)):
            group = parser.add_argument_group(f"{name} ({info.description})")
            if path in spec.flags:  # the nested model's fields as KEY=VALUE pairs too (--set epochs=5)
                group.add_argument(spec.flags[path], dest=_dest(path), default=argparse.SUPPRESS,
                                   help=f"any of the flags below as KEY=VALUE, e.g. {_pair_example(info)}",
                                   **_kind(dict[str, str]))
            add_model_arguments(group, _plain(info.annotation), spec, path + ".")  # type: ignore[arg-type]
            continue
        kind = _kind(info.annotation)
        if path in spec.positional:
            optional = {} if info.is_required() else {"nargs": "?", "default": argparse.SUPPRESS}
            parser.add_argument(_dest(path), help=_help(info), **kind, **optional)
            continue
        if "metavar" not in kind and "choices" not in kind:
            kind["metavar"] = name.upper()
        parser.add_argument(flags[path], dest=_dest(path), default=argparse.SUPPRESS,
                            required=info.is_required() and path not in spec.filled, help=_help(info), **kind)
    if not prefix:
        for alias in spec.aliases:
            keywords = ({"action": "store_const", "const": alias.const} if alias.const is not None
                        else {"metavar": alias.flag.lstrip("-").upper(),
                              **_kind(model_fields(model)[alias.fields[0]].annotation)})
            parser.add_argument(alias.flag, dest="alias__" + alias.flag.lstrip("-").replace("-", "_"),
                                default=argparse.SUPPRESS, help=alias.help.replace("%", "%%"), **keywords)


def _pair_example(info: Any) -> str:
    first = next(iter(model_fields(_plain(info.annotation))))
    return f"{first}=VALUE"


def _nested_models(model: type, prefix: str = "") -> list[str]:
    paths = []
    for name, info in model_fields(model).items():
        if _is_model(_plain(info.annotation)):
            paths += [prefix + name, *_nested_models(_plain(info.annotation), prefix + name + ".")]
    return paths


def given_words(args: argparse.Namespace, model: type, spec: CliSpec = CliSpec()) -> dict[str, str]:
    """Field path -> the words that gave its value on the command line (``--set epochs=five``), for
    error messages."""
    given, words = vars(args), {}
    for path in _nested_models(model):
        for key, value in given.get(_dest(path), ()):
            words[f"{path}.{key}"] = f"{spec.flags[path]} {key}={value}"
    for path, flag in flag_names(model, spec).items():
        if _dest(path) in given:
            value = given[_dest(path)]
            shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            words[path] = shown if path in spec.positional else f"{flag} {shown}"
    return words


def model_values(args: argparse.Namespace, model: type, spec: CliSpec = CliSpec()) -> dict[str, Any]:
    """The values given on the command line, shaped as ``model`` takes them (nested dicts); a
    nested model's own flag wins over its KEY=VALUE pairs."""
    given = vars(args)
    values: dict[str, Any] = {}
    for alias in spec.aliases:
        key = "alias__" + alias.flag.lstrip("-").replace("-", "_")
        if key in given:
            for name in alias.fields:
                values[name] = given[key]
    for path in _nested_models(model):
        if _dest(path) in given:
            _put(values, path, dict(given[_dest(path)]))
    for path in flag_names(model, spec):
        if _dest(path) not in given:
            continue
        value = given[_dest(path)]
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # KEY=VALUE pairs
            value = dict(value)
        _put(values, path, value)
    return values


class ParameterError(ValueError):
    """The parsed words do not make a valid model: one line naming the flags and values at fault."""


def model_from_args(args: argparse.Namespace, model: type[ModelT], spec: CliSpec = CliSpec()) -> ModelT:
    """The model the parsed command line describes; a bad value raises ``ParameterError`` (one line)."""
    if dataclasses.is_dataclass(model):  # argparse typed every value: choices, booleans, KEY=VALUE pairs
        return model(**model_values(args, model, spec))
    from pydantic import ValidationError

    try:
        return model(**model_values(args, model, spec))
    except ValidationError as e:
        raise ParameterError(describe_validation_error(e, flag_names(model, spec), given_words(args, model, spec))) from e


def _put(values: dict[str, Any], path: str, value: Any) -> None:
    *outer, last = path.split(".")
    for part in outer:
        values = values.setdefault(part, {})
    values[last] = {**values.get(last, {}), **value} if isinstance(value, dict) else value


# What a value should be, in a few words, by pydantic's error type.
_WANTS = {"int_parsing": "wants an integer", "int_type": "wants an integer", "int_from_float": "wants an integer",
          "float_parsing": "wants a number", "float_type": "wants a number", "bool_parsing": "wants true or false",
          "extra_forbidden": "unknown setting", "missing": "is required"}


def describe_validation_error(error: ValidationError, flags: Mapping[str, str],
                              words: Mapping[str, str] | None = None) -> str:
    """One line naming the flag and value of each bad setting: ``--n-patches abc: wants an integer``."""
    parts = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"] if not isinstance(p, int))
        where = (words or {}).get(path) or flags.get(path) or path or "arguments"
        ctx = item.get("ctx") or {}
        wants = _WANTS.get(item["type"]) or (
            f"wants a value >= {ctx['ge']}" if "ge" in ctx else f"wants a value <= {ctx['le']}" if "le" in ctx
            else f"wants {ctx['expected']}" if item["type"] == "literal_error" else item["msg"])
        parts.append(f"{where}: {wants}")
    return "; ".join(parts)


def command_line(words: list[str], params: BaseModel, spec: CliSpec = CliSpec()) -> str:
    """The command line (``words`` + flags) that makes ``params``: every value that is set, booleans
    where they differ from the default, a nested model with a KEY=VALUE flag as pairs."""
    argv = list(words)
    fields = type(params).model_fields
    for name, info in sorted(fields.items(), key=lambda item: item[0] not in spec.positional):  # positionals first
        value = getattr(params, name)
        if value is None or (isinstance(value, bool) and value == info.get_default(call_default_factory=True)):
            continue
        if hasattr(value, "model_dump") and name in spec.flags:  # a nested pydantic model
            value = value.model_dump(exclude_none=True)
        if isinstance(value, dict):
            argv += [w for k, v in value.items() for w in (spec.flags.get(name, _flag(name, spec)), f"{k}={_text(v)}")]
        elif isinstance(value, bool):
            argv.append(_flag(name, spec) if value else "--no-" + _flag(name, spec)[2:])
        else:
            argv += [_text(value)] if name in spec.positional else [_flag(name, spec), _text(value)]
    return shlex.join(argv)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def check_inputs(params: BaseModel, spec: CliSpec) -> None:
    """Before a command imports its world: each input that must exist does (a local path), and an
    ``s3://`` one has credentials to read it. Raises the ``UserError`` the command would raise later."""
    from tasks.core.errors import missing_path, require_s3_credentials  # fsspec: only here

    for name, what in spec.inputs.items():
        url = getattr(params, name, None)
        if not isinstance(url, str) or any(c in url for c in "*?[{"):
            continue  # globs and {image_id} templates are resolved by the command itself
        if url.startswith("s3://"):
            require_s3_credentials(url)
        elif "://" not in url or url.startswith("file://"):
            import os

            if not os.path.exists(url.removeprefix("file://")):
                raise missing_path(what, url)
