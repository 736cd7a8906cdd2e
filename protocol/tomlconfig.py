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
            value = build_dataclass(target, {**_default_table(cls, name, target), **value}, base, f"{where}.{name}")
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


def _default_table(cls: type, name: str, target: type) -> dict:
    """The keys of field `name`'s default (a dataclass instance), so that a partial table keeps the documented
    defaults of the keys it leaves out (e.g. `[plan] lr = 0.1` in cloud.toml). Paths are left to the table."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        return {}
    if not isinstance(default, target):
        return {}
    return {f.name: value for f in dataclasses.fields(default) if f.init
            and (value := getattr(default, f.name)) is not None and not isinstance(value, Path)
            and not dataclasses.is_dataclass(value)}


def load_toml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return build_dataclass(cls, raw, path.resolve().parent, path.name)


def plain(value: object) -> object:
    """A config as TOML-able data: dataclasses as tables, paths as strings, None left out (TOML has no null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_toml(cfg: object) -> str:
    """The effective config (every default filled in, paths resolved) as TOML: what `check-config` prints."""
    import tomli_w

    return tomli_w.dumps(plain(cfg))


def check_files(cfg: object, outputs: frozenset[str] = frozenset(), where: str = "") -> None:
    """Every path the config names must exist, except fields named in `outputs` (directories the daemon creates:
    state_dir, run_dir, ...): ConfigError naming the key and the path, so a daemon says it in one line at start."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            check_files(value, outputs, key + ".")
        elif isinstance(value, Path) and f.name not in outputs and key not in outputs and not value.exists():
            raise ConfigError(f"{key}: {value} does not exist")


def add_check_config(sub: argparse._SubParsersAction, load_config: Callable[[str], object],
                     outputs: frozenset[str] = frozenset()) -> None:
    """The daemons' `check-config --config FILE`: load and validate a config, check that every file it names
    exists, print the effective config as TOML and exit 0; a bad file is a ConfigError, which the fediomt CLI
    prints as one line with exit status 2."""
    check = sub.add_parser("check-config", help="validate a config and the files it names; print it as TOML")
    check.add_argument("--config", required=True)

    def run(args: argparse.Namespace) -> int:
        cfg = load_config(args.config)
        check_files(cfg, outputs)
        print(to_toml(cfg), end="")
        return 0

    check.set_defaults(func=run)


def lock_dir(directory: str | Path, what: str = "state_dir"):
    """Hold an exclusive lock on `directory` (its `.lock` file, flock) for as long as the returned file stays open:
    two daemons on one state directory would undo each other's state and knock each other off the broker (one
    client id). A second one gets a ConfigError naming the holder's pid (one line, exit status 2)."""
    import fcntl
    import os

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "a+")  # noqa: SIM115 - held open by the caller for the process lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"{what} {directory} is in use by another process (pid {holder}): two daemons cannot share "
                          "a state directory") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
