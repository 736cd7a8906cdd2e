"""TOML config files -> frozen dataclasses, the same rules for every daemon (device, edge, cloud).

Known keys only (a typo must not silently fall back to a default), nested tables become the annotated nested
dataclasses, paths resolve against the config file's own directory (a device directory can be copied or flashed
as a whole), integers are accepted where a float is declared, and every problem (unreadable file, bad TOML,
unknown or missing key, wrong type, a value the config's own checks refuse) is one `ConfigError` naming the file
and key, which the CLI prints as one line (an operator's mistake, not a traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def build_dataclass(cls: type[T], raw: dict, base: Path, where: str) -> T:
    """Instantiate dataclass `cls` from the TOML table `raw`; `where` names the table in error messages."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        options = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
        target = options[0]
        if dataclasses.is_dataclass(target):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a table")
            value = build_dataclass(target, value, base, f"{where}.{name}")
        elif target is Path:
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{name}: expected a path (a string)")
            value = base / Path(value).expanduser()
        elif target is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a missing required key, or the dataclass's own checks
        raise ConfigError(f"{where}: {exc}") from None


def load_toml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return build_dataclass(cls, raw, path.resolve().parent, path.name)


def add_check_config(sub: argparse._SubParsersAction, load_config: Callable[[str], object]) -> None:
    """The daemons' `check-config --config FILE`: load and validate a config, print it and exit (a bad file is a
    ConfigError, which the fediomt CLI prints as one line)."""
    check = sub.add_parser("check-config", help="load and validate a config, print it and exit")
    check.add_argument("--config", required=True)
    check.set_defaults(func=lambda args: print(load_config(args.config)) or 0)
