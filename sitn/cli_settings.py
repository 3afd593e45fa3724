"""Command-line options generated from pydantic-settings models, so that a setting is defined once.

A field of a settings class (``RunSettings``, ``ServingSettings``, ``StreamSettings``...) is the one
definition of a setting: its type, bounds, default, description and environment variable
(``env_prefix`` + name). :class:`SettingsFlags` turns some or all fields of one class into ``argparse``
options of a subcommand and builds the object back from the parsed arguments:

- ``--kebab-case`` per field (or a name kept from before, ``names``); the type from the annotation:
  ``Literal`` gives choices, ``bool`` gives ``--flag`` / ``--no-flag``, a tuple a comma list, ``Path`` a
  path, a dict JSON; ``X | None`` takes an ``X``.
- help = the field's description, its default and its environment variable. What an unset value means is
  told where it applies only: a field's ``json_schema_extra={"unset": ...}`` is added to the help where the
  command's default is unset (``kafka_bootstrap_servers``: the embedded log in ``sitn run`` and ``sitn replay``;
  ``sitn serve`` defaults to a broker and has no embedded log).
- precedence: a flag given on the command line, then the environment variable, then the default. Only
  flags actually given override (every option defaults to ``None`` in the namespace).
- secrets (``SecretStr``) get no option: they come from the environment only, since ``ps`` shows every
  process's command line (docs/security.md).
- a derived field (``derived``: set by the composition root from its owner, e.g. serving's ``dim`` from the
  learner's) gets no option and ignores its own environment variable: the value passed to :meth:`build` wins.
- a value the model refuses raises :class:`~stream.errors.ConfigError` naming the flag or the variable it
  came from, what was received (unless the model hides inputs) and what is allowed.

Why not pydantic-settings' own ``CliSettingsSource`` (2.16, installed): it adds *every* field of a model to a
parser, so ``sitn run``'s ``--host``/``--port`` (serving) and ``--kafka-bootstrap-servers`` (stream) would
need wrapper models, and two models on one subcommand collide (``batch_size`` is a field of ``RunSettings``
and of ``StreamSettings``); its help does not name the environment variable, and its errors name the field,
not the flag. The bridge below is the part we need, on plain ``argparse``.

>>> import argparse
>>> from pydantic import Field
>>> from pydantic_settings import BaseSettings, SettingsConfigDict
>>> class Demo(BaseSettings):
...     model_config = SettingsConfigDict(env_prefix="DEMO_", frozen=True)
...     batch_size: int = Field(256, ge=1, description="examples per step")
...     weights: tuple[float, ...] = Field((0.5, 1.0), description="fused weights")
>>> flags = SettingsFlags(Demo)
>>> parser = argparse.ArgumentParser(prog="demo")
>>> [action.dest for action in flags.add_to(parser)]
['batch_size', 'weights']
>>> flags.help_of("batch_size")
'examples per step [default: 256; env DEMO_BATCH_SIZE]'
>>> class Backend(BaseSettings):
...     model_config = SettingsConfigDict(env_prefix="DEMO_", frozen=True)
...     servers: str | None = Field(None, description="brokers", json_schema_extra={"unset": "the local log"})
>>> SettingsFlags(Backend).help_of("servers")
'brokers; unset = the local log [default: unset; env DEMO_SERVERS]'
>>> SettingsFlags(Backend, defaults={"servers": "h:9092"}).help_of("servers")
'brokers [default: h:9092; env DEMO_SERVERS]'
>>> flags.build(parser.parse_args(["--weights", "1,3"]), environ={})
Demo(batch_size=256, weights=(1.0, 3.0))
>>> flags.build(parser.parse_args(["--batch-size", "0"]), environ={})
Traceback (most recent call last):
...
stream.errors.ConfigError: --batch-size: Input should be greater than or equal to 1, got 0
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from stream.errors import ConfigError


class SettingsFlags:
    """The command-line options of some fields of one settings class.

    ``fields``: the fields that get an option (default: every field that is neither a secret nor
    ``derived``), less ``exclude``. ``names``: field -> flag name where it is not the field's kebab case (a flag kept from
    before). ``env_aliases``: field -> older environment variables still read when the field's own is unset.
    ``defaults``: field -> this command's default where it differs from the field's (read when neither the
    flag nor a variable is set). ``derived``: fields the composition root sets from their owner.
    """

    def __init__(
        self,
        model: type[BaseSettings],
        fields: Iterable[str] | None = None,
        *,
        exclude: Iterable[str] = (),
        names: Mapping[str, str] | None = None,
        env_aliases: Mapping[str, Iterable[str]] | None = None,
        defaults: Mapping[str, Any] | None = None,
        derived: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.derived = tuple(derived)
        known = model.model_fields
        if fields is None:
            fields = [name for name, info in known.items()
                      if name not in self.derived and not _is_secret(info.annotation)]
        self.fields = tuple(field for field in fields if field not in set(exclude))
        self.names = dict(names or {})
        self.env_aliases = {field: tuple(aliases) for field, aliases in (env_aliases or {}).items()}
        self.defaults = dict(defaults or {})
        for field in (*self.fields, *exclude, *self.names, *self.env_aliases, *self.defaults, *self.derived):
            if field not in known:
                raise ValueError(f"{model.__name__} has no field {field!r}; its fields: {sorted(known)}")
        for field in self.fields:
            if field in self.derived:
                raise ValueError(f"{model.__name__}.{field} is derived from its owner and cannot also be a flag")
            if _is_secret(known[field].annotation):
                raise ValueError(f"{model.__name__}.{field} is a secret: environment only, never a flag")

    # -- names ------------------------------------------------------------------------------------------

    def flag(self, field: str) -> str:
        return "--" + self.names.get(field, field.replace("_", "-"))

    def dest(self, field: str) -> str:
        return self.flag(field)[2:].replace("-", "_")

    def env_var(self, field: str) -> str:
        return f"{self.model.model_config.get('env_prefix', '')}{field}".upper()

    def default_of(self, field: str) -> Any:
        if field in self.defaults:
            return self.defaults[field]
        return self.model.model_fields[field].get_default(call_default_factory=True)

    def help_of(self, field: str) -> str:
        info = self.model.model_fields[field]
        env = self.env_var(field)
        aliases = self.env_aliases.get(field, ())
        if aliases:
            env += f" (also read: {', '.join(aliases)})"
        default = self.default_of(field)
        text = info.description or field.replace("_", " ")
        unset = _unset_meaning(info)
        if default is None and unset:  # told only where this command leaves the field unset
            text += f"; unset = {unset}"
        text += f" [default: {_show(default)}; env {env}]"
        return text.replace("%", "%%")  # argparse formats help with %

    # -- parser -----------------------------------------------------------------------------------------

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> list[argparse.Action]:
        """Add one option per field; every option's value is ``None`` unless given. Returns the options added."""
        added = []
        for field in self.fields:
            kind, arg_type, choices = _argument_type(self.model.model_fields[field].annotation)
            options: dict[str, Any] = {"dest": self.dest(field), "default": None, "help": self.help_of(field)}
            if kind == "bool":
                options["action"] = argparse.BooleanOptionalAction
            else:
                options["type"] = arg_type
                if choices is not None:
                    options["choices"] = choices
                else:
                    options["metavar"] = kind
            added.append(parser.add_argument(self.flag(field), **options))
        return added

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """Field -> value of the options given on the command line."""
        return {field: value for field in self.fields if (value := getattr(args, self.dest(field), None)) is not None}

    def build(self, args: argparse.Namespace, environ: Mapping[str, str] | None = None, **derived: Any) -> Any:
        """The settings object: ``derived`` values, then flags given, then the environment (the field's
        variable, then its older names), then this command's default, then the field's default.

        ``environ`` only decides where the older names and this command's defaults apply; the model reads
        its own variables itself (pydantic-settings), from ``os.environ``."""
        environ = os.environ if environ is None else environ
        unknown = set(derived) - set(self.derived)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not derived fields of {self.model.__name__} ({list(self.derived)})")
        values: dict[str, Any] = dict(derived)
        origin: dict[str, str] = {field: "derived" for field in derived}
        for field, value in self.given(args).items():
            values[field] = value
            origin[field] = self.flag(field)
        lowered = {key.lower(): key for key in environ}
        for field in {*self.env_aliases, *self.defaults}:
            if field in values or self.env_var(field).lower() in lowered:
                continue
            alias = next((a for a in self.env_aliases.get(field, ()) if a.lower() in lowered), None)
            if alias is not None:
                values[field] = environ[lowered[alias.lower()]]
                origin[field] = f"env {alias}"
            elif field in self.defaults:
                values[field] = self.defaults[field]
                origin[field] = "default"
        try:
            return self.model(**values)
        except ValidationError as exc:
            raise ConfigError(self._explain(exc, origin)) from None

    def _explain(self, exc: ValidationError, origin: Mapping[str, str]) -> str:
        hide = bool(self.model.model_config.get("hide_input_in_errors"))
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else None
            message = error["msg"].removeprefix("Value error, ")
            if not hide and field is not None and "input" in error:
                message += f", got {error['input']!r}"
            if field is None:
                where = self.model.__name__
            elif origin.get(field, "").startswith("--"):
                where = origin[field]
            elif origin.get(field) == "derived":
                where = f"{self.model.__name__}.{field} (derived)"
            elif origin.get(field, "").startswith("env "):
                where = origin[field].removeprefix("env ")
            elif field in self.fields:
                where = f"{self.flag(field)} / {self.env_var(field)}"
            else:
                where = self.env_var(field)
            lines.append(f"{where}: {message}")
        return "; ".join(lines)


def _is_secret(annotation: Any) -> bool:
    return SecretStr in (annotation, *typing.get_args(annotation))


def _unset_meaning(info: FieldInfo) -> str | None:
    """What the field's unset value means (``json_schema_extra={"unset": ...}``), if it says."""
    extra = info.json_schema_extra
    meaning = extra.get("unset") if isinstance(extra, dict) else None
    return meaning if isinstance(meaning, str) else None


def _argument_type(annotation: Any) -> tuple[str, Callable[[str], Any] | None, list[Any] | None]:
    """(metavar or kind, argparse type, choices) of a field's annotation; ``X | None`` is ``X``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no command-line type for {annotation!r}")
        return _argument_type(inner[0])
    if typing.get_origin(annotation) is Literal:
        return "choice", type(args[0]), list(args)
    if annotation is bool:
        return "bool", None, None
    if annotation in (int, float):
        return annotation.__name__.upper(), annotation, None
    if annotation is str:
        return "TEXT", str, None
    if annotation is Path:
        return "PATH", Path, None
    if typing.get_origin(annotation) is tuple:
        item = args[0] if args else str
        return "X,Y,...", _comma_list(item), None
    if typing.get_origin(annotation) is dict:
        return "JSON", _json, None
    raise TypeError(f"no command-line type for {annotation!r}")


def _comma_list(item: type) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {item.__name__} list"  # argparse names it in its error
    return parse


def _json(text: str) -> Any:
    return json.loads(text)


_json.__name__ = "JSON"


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "empty"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)
