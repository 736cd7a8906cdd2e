"""Strict CBOR codec for message dataclasses: the schema is the dataclass, the decoder trusts nothing.

A message is a CBOR array `[kind, version, field1, field2, ...]` holding every field in dataclass order (None is
CBOR null); a nested dataclass is the array of its fields in order, a `dict` field a map, a `list` field an array.
Positions instead of names keep small messages small (a DeviceUpdate envelope is mostly field names otherwise).
The decoder enforces, before building anything: a maximum message size, no trailing bytes, the known kind and
schema version, exactly as many elements as declared fields, exact CBOR types (a bool is not an int, an int is not
a float; a float may be half, single or double), finite floats, 64-bit integer range, and per-field limits
(`field(metadata=limit(max_len=...))`, with defaults below). Any violation raises `ProtocolError` with a reason
code; nothing else escapes.

Before cbor2 builds anything, `scan` walks the item headers (no objects made) and refuses tags, indefinite
lengths, nesting deeper than MAX_DEPTH, more than MAX_ITEMS items, lengths past the end, trailing bytes, and any
input whose decoded objects would take more than MEMORY_FACTOR x its size (at least MEMORY_FACTOR x
MEMORY_FLOOR): 4 MiB of empty arrays cost 4.7 s and 64x their size in memory without it. The item cap bounds the
scan itself (about 0.3 us an item), so every refusal is cheap.

`decode_as` reads the older named layout (a map per dataclass) for objects that are not wire messages and define
their own encoding (ledger blocks), with the same rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import cbor2

from protocol.errors import ProtocolError, Reason

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_STR = 1024
DEFAULT_MAX_BYTES = MAX_MESSAGE_BYTES
DEFAULT_MAX_ITEMS = 100_000
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
MAX_DEPTH = 16           # arrays and maps inside one another; the deepest schema (ledger catch-up) needs 6
MAX_ITEMS = 1 << 16      # CBOR data items in one message (a map entry is two): per-device tables fit ~20,000 devices
MEMORY_FACTOR = 16       # decoded objects may take this many times the input's size...
MEMORY_FLOOR = 64 * 1024  # ...counting a smaller input as this big
SCHEMA_VERSION = 2

_REGISTRY: dict[str, type] = {}
M = TypeVar("M")
Check = Callable[[Any], Any]  # a compiled field rule: the value as the dataclass wants it, or _Invalid


def limit(max_len: int | None = None, min_len: int = 0, min_value: float | None = None,
          max_value: float | None = None, items: dict | None = None) -> dict:
    """Field metadata: length bounds for str/bytes/list/dict, value bounds for numbers, `items` for elements."""
    return {"max_len": max_len, "min_len": min_len, "min_value": min_value, "max_value": max_value,
            "items": items or {}}


def register(kind: str, version: int = SCHEMA_VERSION) -> Callable[[type[M]], type[M]]:
    """Class decorator: make a dataclass a wire message of type `kind` at schema `version`."""

    def decorate(cls: type[M]) -> type[M]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"message kind {kind!r} registered twice")
        cls.KIND = kind
        cls.VERSION = version
        _REGISTRY[kind] = cls
        return cls

    return decorate


def registry() -> dict[str, type]:
    return dict(_REGISTRY)


# ---------------------------------------------------------------- schema (once per class)
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """(name, type) of every field in order."""
    hints = _hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


# ---------------------------------------------------------------- encoding
@functools.cache
def _args(tp: Any) -> tuple:
    return typing.get_args(tp)


@functools.cache
def _wants_float(tp: Any) -> bool:
    options = _args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return float in options and int not in options


def _plain(value: Any, tp: Any) -> Any:
    """The CBOR data model of `value` declared as `tp`: dataclasses as arrays, ints where floats are declared as
    floats (the decoder would refuse them)."""
    if type(value) is int and _wants_float(tp):
        return float(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_plain(getattr(value, name), ftp) for name, ftp in _fields(type(value))]
    args = _args(tp)
    if isinstance(value, (list, tuple)):
        return [_plain(v, args[0] if len(args) == 1 else None) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, args[1] if len(args) == 2 else None) for k, v in value.items()}
    return value


def to_wire(msg: Any) -> list:
    """`[kind, version, field1, ...]`: the message in the CBOR data model."""
    cls = type(msg)
    if getattr(cls, "KIND", None) is None:
        raise TypeError(f"{cls.__name__} is not a registered message")
    return [cls.KIND, cls.VERSION, *_plain(msg, None)]


def encode(msg: Any) -> bytes:
    """Deterministic CBOR (RFC 8949 core: shortest integers and floats, sorted map keys), so that a signature
    covers one exact byte string."""
    return cbor2.dumps(to_wire(msg), canonical=True)


# ---------------------------------------------------------------- decoding
class _Invalid(Exception):
    """A rule violation on its way out: the path is collected while it propagates (only failures pay for it)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.path = reason, detail, []

    def error(self, root: str) -> ProtocolError:
        return ProtocolError(self.reason, f"{root}{''.join(reversed(self.path))}: {self.detail}")


def _located(exc: _Invalid, step: str) -> _Invalid:
    exc.path.append(step)
    return exc


def _check_len(n: int, meta: dict, default_max: int) -> None:
    max_len = meta.get("max_len") or default_max
    if n > max_len:
        raise _Invalid(Reason.TOO_LARGE, f"length {n} > {max_len}")
    if n < (meta.get("min_len") or 0):
        raise _Invalid(Reason.MALFORMED, f"length {n} < {meta['min_len']}")


def _wrong_type(expected: str, value: Any) -> _Invalid:
    return _Invalid(Reason.WRONG_TYPE, f"expected {expected}, got {type(value).__name__}")


def _boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise _wrong_type("bool", value)
    return value


def _number(py: type, meta: dict) -> Check:
    lo, hi = meta.get("min_value"), meta.get("max_value")
    name = py.__name__

    def check(value: Any) -> Any:
        if type(value) is not py:
            raise _wrong_type(name, value)
        if py is int and not INT_MIN <= value <= INT_MAX:
            raise _Invalid(Reason.BAD_VALUE, "integer out of 64-bit range")
        if py is float and not math.isfinite(value):
            raise _Invalid(Reason.NON_FINITE, "NaN or infinity")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _Invalid(Reason.BAD_VALUE, f"{value} outside [{lo}, {hi}]")
        return value

    return check


def _sized(py: type, name: str, meta: dict, default_max: int) -> Check:
    def check(value: Any) -> Any:
        if type(value) is not py:
            raise _wrong_type(name, value)
        _check_len(len(value), meta, default_max)
        return value

    return check


def _list(item: Check, meta: dict) -> Check:
    def check(value: Any) -> list:
        if type(value) is not list:
            raise _wrong_type("array", value)
        _check_len(len(value), meta, DEFAULT_MAX_ITEMS)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except _Invalid as exc:
                raise _located(exc, f"[{i}]") from None
        return out

    return check


def _map(item: Check, meta: dict) -> Check:
    def check(value: Any) -> dict:
        if type(value) is not dict:
            raise _wrong_type("map", value)
        _check_len(len(value), meta, DEFAULT_MAX_ITEMS)
        out = {}
        for k, v in value.items():
            if type(k) is not str or len(k) > DEFAULT_MAX_STR:
                raise _Invalid(Reason.WRONG_TYPE, "map keys must be short text")
            try:
                out[k] = item(v)
            except _Invalid as exc:
                raise _located(exc, f".{k}") from None
        return out

    return check


def _union(alternatives: tuple, meta: dict, positional: bool) -> Check:
    """Dispatch on the CBOR type of the value; alternatives sharing a CBOR type are tried in order."""
    by_type: dict[type, list[Check]] = {}
    for alt in alternatives:
        if alt is not type(None):
            by_type.setdefault(_wire_type(alt, positional), []).append(_compile(alt, meta, positional))
    allow_null = type(None) in alternatives

    def check(value: Any) -> Any:
        if value is None:
            if allow_null:
                return None
            raise _Invalid(Reason.WRONG_TYPE, "null not allowed")
        candidates = by_type.get(type(value))
        if not candidates:
            raise _Invalid(Reason.WRONG_TYPE, f"{type(value).__name__} not allowed")
        errors = []
        for candidate in candidates:
            try:
                return candidate(value)
            except _Invalid as exc:
                errors.append(exc)
        raise errors[0]

    return check


def _wire_type(tp: Any, positional: bool) -> type:
    if dataclasses.is_dataclass(tp):
        return list if positional else dict
    return typing.get_origin(tp) or tp


def _compile(tp: Any, meta: dict, positional: bool) -> Check:
    """The rule for one declared type and its limits, built once per field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(args, meta, positional)
    if tp is bool:
        return _boolean
    if tp in (int, float):
        return _number(tp, meta)
    if tp is str:
        return _sized(str, "text", meta, DEFAULT_MAX_STR)
    if tp is bytes:
        return _sized(bytes, "bytes", meta, DEFAULT_MAX_BYTES)
    if origin is list:
        return _list(_compile(args[0], meta.get("items", {}), positional), meta)
    if origin is dict:
        return _map(_compile(args[1], meta.get("items", {}), positional), meta)
    if dataclasses.is_dataclass(tp):
        return functools.partial(_build, tp, positional=positional)
    raise TypeError(f"unsupported field type {tp!r}")


@functools.cache
def _rules(cls: type, positional: bool) -> tuple[tuple[str, Check], ...]:
    """(name, compiled rule) of every field in order: computed once per class and layout (the hot path)."""
    return tuple((f.name, _compile(_hints(cls)[f.name], dict(f.metadata), positional))
                 for f in dataclasses.fields(cls))


def _build(cls: type, obj: Any, positional: bool = True) -> Any:
    """An instance of `cls` from its array (positional) or map of fields, every rule checked first."""
    rules = _rules(cls, positional)
    if positional:
        if type(obj) is not list:
            raise _Invalid(Reason.MALFORMED, f"expected array, got {type(obj).__name__}")
        if len(obj) != len(rules):
            raise _Invalid(Reason.MALFORMED, f"{len(obj)} elements, {cls.__name__} has {len(rules)} fields")
        values = obj
    else:
        values = _named_values(cls, obj, rules)
    args = []
    for (name, rule), value in zip(rules, values):
        try:
            args.append(rule(value))
        except _Invalid as exc:
            raise _located(exc, f".{name}") from None
    try:
        return cls(*args)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:  # a dataclass __post_init__ refusing the values
        raise _Invalid(Reason.BAD_VALUE, str(exc)) from None


def _named_values(cls: type, obj: Any, rules: tuple[tuple[str, Check], ...]) -> list:
    if type(obj) is not dict:
        raise _Invalid(Reason.MALFORMED, f"expected map, got {type(obj).__name__}")
    names = [name for name, _ in rules]
    extra = set(obj) - set(names)
    if extra:
        raise _Invalid(Reason.MALFORMED, f"unknown fields {sorted(map(str, extra))[:5]}")
    missing = [name for name in names if name not in obj]
    if missing:
        raise _Invalid(Reason.MALFORMED, f"missing field {missing[0]!r} of {cls.__name__}")
    return [obj[name] for name in names]


_ARG_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}  # additional information -> bytes of the argument that follow
# Upper bounds of what cbor2 and `_build` allocate per decoded item (CPython 3.11, 64-bit), measured with tracemalloc
_STRING_COST, _SCALAR_COST = 64, 40           # str/bytes header (+ its length); int/float/bool/None
_ARRAY_COST, _ARRAY_SLOT = 128, 16             # list header, per element (cbor2's list and the rebuilt one)
_MAP_COST, _MAP_ENTRY = 256, 112               # dict header, per entry (hash table, twice)


def scan(data: bytes) -> None:
    """Refuse, from the item headers alone, CBOR that is not one definite-length, untagged item within MAX_DEPTH,
    MAX_ITEMS and the memory bound; ProtocolError(TOO_LARGE or MALFORMED) with the reason."""
    n = len(data)
    budget = MEMORY_FACTOR * max(n, MEMORY_FLOOR)
    pos = cost = 0
    declared = 1   # items the headers read so far announce (>= those read): refused once over MAX_ITEMS
    pending = [1]  # items still to read at each open nesting level
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= n:
            raise ProtocolError(Reason.MALFORMED, "truncated CBOR")
        major, arg = data[pos] >> 5, data[pos] & 31
        pos += 1
        if arg >= 24:
            width = _ARG_BYTES.get(arg)
            if width is None:
                raise ProtocolError(Reason.MALFORMED, "indefinite-length or reserved CBOR item")
            arg = int.from_bytes(data[pos:pos + width], "big")
            pos += width
        if major == 2 or major == 3:
            pos += arg
            cost += _STRING_COST + arg
        elif major == 4 or major == 5:
            cost += _ARRAY_COST + _ARRAY_SLOT * arg if major == 4 else _MAP_COST + _MAP_ENTRY * arg
            arg *= major - 3  # a map entry is two items
            if arg > n - pos:
                raise ProtocolError(Reason.MALFORMED, f"container of {arg} items in {n - pos} bytes")
            declared += arg
            if declared > MAX_ITEMS:
                raise ProtocolError(Reason.TOO_LARGE, f"more than {MAX_ITEMS} CBOR items")
            pending.append(arg)
            if len(pending) > MAX_DEPTH + 1:
                raise ProtocolError(Reason.TOO_LARGE, f"nesting deeper than {MAX_DEPTH}")
        elif major == 6:  # tags 2 and 3 are bignums: integers out of the 64-bit range
            raise ProtocolError(*((Reason.BAD_VALUE, "integer out of 64-bit range") if arg in (2, 3)
                                  else (Reason.MALFORMED, f"CBOR tag {arg} not allowed")))
        else:
            cost += _SCALAR_COST
        if cost > budget:
            raise ProtocolError(Reason.TOO_LARGE, f"decoding {n} bytes would take over {budget} bytes of memory")
    if pos != n:
        raise ProtocolError(Reason.MALFORMED, "truncated CBOR" if pos > n else "trailing bytes after the message")


def load_cbor(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> object:
    """Parse exactly one CBOR item of at most `max_bytes` that passes `scan`; ProtocolError otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, "message is not bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ProtocolError(Reason.TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    scan(data)
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises many types on garbage (bad UTF-8, ...); all mean the same to us
        raise ProtocolError(Reason.MALFORMED, f"not CBOR: {type(exc).__name__}") from None


def decode_as(cls: type[M], data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode a CBOR map of named fields (nested dataclasses maps too) into `cls` with the message rules, for
    objects that are not wire messages and carry their own schema version (ledger blocks and votes)."""
    obj = load_cbor(data, max_bytes)
    try:
        return _build(cls, obj, positional=False)
    except _Invalid as exc:
        raise exc.error(cls.__name__) from None


def stored_schema_is_older(data: bytes) -> bool:
    """Whether `data`, a message this process stored itself, is of a known kind at an older schema version than
    this code speaks: what a daemon finds in its checkpoint after an upgrade across a version bump (anything else
    still goes through `decode` and its errors)."""
    try:
        obj = load_cbor(data, MAX_MESSAGE_BYTES)
    except ProtocolError:
        return False
    if type(obj) is not list or len(obj) < 2 or type(obj[0]) is not str or obj[0] not in _REGISTRY:
        return False
    return type(obj[1]) is int and obj[1] < _REGISTRY[obj[0]].VERSION


def decode(data: bytes, expect: type[M] | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode one message; `expect` restricts the kind. Raises ProtocolError on anything unexpected."""
    obj = load_cbor(data, max_bytes)
    if type(obj) is not list or len(obj) < 2:
        raise ProtocolError(Reason.MALFORMED, "message is not an array [kind, version, fields...]")
    kind, version = obj[0], obj[1]
    if type(kind) is not str or kind not in _REGISTRY:
        raise ProtocolError(Reason.WRONG_TYPE, f"unknown message type {str(kind)[:40]!r}")
    cls = _REGISTRY[kind]
    if expect is not None and cls is not expect:
        raise ProtocolError(Reason.WRONG_TYPE, f"expected {expect.KIND!r}, got {kind!r}")
    if type(version) is not int or version != cls.VERSION:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"{kind} schema version {version!r}, we speak {cls.VERSION}")
    try:
        return _build(cls, obj[2:])
    except _Invalid as exc:
        raise exc.error(kind) from None
