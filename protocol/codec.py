"""Strict CBOR codec for message dataclasses: the schema is the dataclass, the decoder trusts nothing.

A message is a CBOR map `{"t": kind, "v": version, <field>: <value>, ...}` with every field present (None is CBOR
null). The decoder enforces, before building anything: a maximum message size, no trailing bytes, the known kind
and schema version, exactly the declared fields, exact CBOR types (a bool is not an int, an int is not a float),
finite floats, 64-bit integer range, and per-field length limits (`field(metadata=limit(max_len=...))`, with
defaults below). Any violation raises `ProtocolError` with a reason code; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
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

_REGISTRY: dict[str, type] = {}
M = TypeVar("M")


def limit(max_len: int | None = None, min_len: int = 0, min_value: float | None = None,
          max_value: float | None = None, items: dict | None = None) -> dict:
    """Field metadata: length bounds for str/bytes/list/dict, value bounds for numbers, `items` for elements."""
    return {"max_len": max_len, "min_len": min_len, "min_value": min_value, "max_value": max_value,
            "items": items or {}}


def register(kind: str, version: int = 1) -> Callable[[type[M]], type[M]]:
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


# ---------------------------------------------------------------- encoding
def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def to_wire(msg: Any, exclude: tuple[str, ...] = ()) -> dict:
    cls = type(msg)
    if getattr(cls, "KIND", None) is None:
        raise TypeError(f"{cls.__name__} is not a registered message")
    out = {"t": cls.KIND, "v": cls.VERSION}
    hints = _hints(cls)
    for f in dataclasses.fields(msg):
        if f.name in exclude:
            continue
        value = getattr(msg, f.name)
        if hints[f.name] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[f.name] = _to_plain(value)
    return out


def encode(msg: Any) -> bytes:
    """Canonical CBOR (RFC 8949 deterministic encoding), so signatures cover one exact byte string."""
    return cbor2.dumps(to_wire(msg), canonical=True)


def canonical_without(msg: Any, *fields: str) -> bytes:
    return cbor2.dumps(to_wire(msg, exclude=fields), canonical=True)


# ---------------------------------------------------------------- decoding
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


@functools.cache
def _schema(cls: type) -> tuple[tuple[tuple[str, Any, dict], ...], frozenset[str]]:
    """(name, type, metadata) of every field, and the set of names: computed once per class (hot path)."""
    hints = _hints(cls)
    fields = tuple((f.name, hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls))
    return fields, frozenset(name for name, _, _ in fields)


@functools.cache
def _shape(tp: Any) -> tuple[Any, tuple]:
    return typing.get_origin(tp), typing.get_args(tp)


def _fail(reason: Reason, path: str, detail: str) -> typing.NoReturn:
    raise ProtocolError(reason, f"{path}: {detail}")


def _check_len(n: int, meta: dict, default_max: int, path: str) -> None:
    max_len = meta.get("max_len") or default_max
    if n > max_len:
        _fail(Reason.TOO_LARGE, path, f"length {n} > {max_len}")
    if n < (meta.get("min_len") or 0):
        _fail(Reason.MALFORMED, path, f"length {n} < {meta['min_len']}")


def _check_range(value: float, meta: dict, path: str) -> None:
    lo, hi = meta.get("min_value"), meta.get("max_value")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(Reason.BAD_VALUE, path, f"{value} outside [{lo}, {hi}]")


def _convert(value: Any, tp: Any, meta: dict, path: str) -> Any:
    origin, args = _shape(tp)
    if origin in (typing.Union, types.UnionType):
        alternatives = args
        if value is None:
            if type(None) in alternatives:
                return None
            _fail(Reason.WRONG_TYPE, path, "null not allowed")
        errors = []
        # the alternative of the value's own type first: no exception on the common path
        for alt in sorted(alternatives, key=lambda a: a is not type(value)):
            if alt is type(None):
                continue
            try:
                return _convert(value, alt, meta, path)
            except ProtocolError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Any:
        _fail(Reason.WRONG_TYPE, path, "untyped field")
    if tp is bool:
        if type(value) is not bool:
            _fail(Reason.WRONG_TYPE, path, f"expected bool, got {type(value).__name__}")
        return value
    if tp is int:
        if type(value) is not int:
            _fail(Reason.WRONG_TYPE, path, f"expected int, got {type(value).__name__}")
        if not INT_MIN <= value <= INT_MAX:
            _fail(Reason.BAD_VALUE, path, "integer out of 64-bit range")
        _check_range(value, meta, path)
        return value
    if tp is float:
        if type(value) is not float:
            _fail(Reason.WRONG_TYPE, path, f"expected float, got {type(value).__name__}")
        if not math.isfinite(value):
            _fail(Reason.NON_FINITE, path, "NaN or infinity")
        _check_range(value, meta, path)
        return value
    if tp is str:
        if type(value) is not str:
            _fail(Reason.WRONG_TYPE, path, f"expected text, got {type(value).__name__}")
        _check_len(len(value), meta, DEFAULT_MAX_STR, path)
        return value
    if tp is bytes:
        if type(value) is not bytes:
            _fail(Reason.WRONG_TYPE, path, f"expected bytes, got {type(value).__name__}")
        _check_len(len(value), meta, DEFAULT_MAX_BYTES, path)
        return value
    if origin is list:
        if type(value) is not list:
            _fail(Reason.WRONG_TYPE, path, f"expected array, got {type(value).__name__}")
        _check_len(len(value), meta, DEFAULT_MAX_ITEMS, path)
        (item_tp,) = args
        item_meta = meta.get("items", {})
        return [_convert(v, item_tp, item_meta, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if type(value) is not dict:
            _fail(Reason.WRONG_TYPE, path, f"expected map, got {type(value).__name__}")
        _check_len(len(value), meta, DEFAULT_MAX_ITEMS, path)
        _, value_tp = args
        out = {}
        for k, v in value.items():
            if type(k) is not str or len(k) > DEFAULT_MAX_STR:
                _fail(Reason.WRONG_TYPE, path, "map keys must be short text")
            out[k] = _convert(v, value_tp, meta.get("items", {}), f"{path}.{k}")
        return out
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise TypeError(f"unsupported field type {tp!r} at {path}")


def _build(cls: type, obj: Any, path: str, skip: tuple[str, ...] = ()) -> Any:
    if type(obj) is not dict:
        _fail(Reason.MALFORMED, path, f"expected map, got {type(obj).__name__}")
    fields, names = _schema(cls)
    extra = set(obj) - names - set(skip)
    if extra:
        _fail(Reason.MALFORMED, path, f"unknown fields {sorted(map(str, extra))[:5]}")
    kwargs = {}
    for name, tp, meta in fields:
        if name not in obj:
            _fail(Reason.MALFORMED, path, f"missing field {name!r}")
        kwargs[name] = _convert(obj[name], tp, meta, f"{path}.{name}")
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:  # a dataclass __post_init__ refusing the values
        _fail(Reason.BAD_VALUE, path, str(exc))


def _reject_tags(tag, immutable):  # noqa: ARG001 - cbor2's tag_hook signature
    raise ValueError(f"CBOR tag {tag.tag} not allowed")


def load_cbor(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> object:
    """Parse exactly one CBOR item of at most `max_bytes`: no tags, no trailing bytes; ProtocolError otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, "message is not bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ProtocolError(Reason.TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream, tag_hook=_reject_tags).decode()
    except Exception as exc:  # cbor2 raises many types on garbage; all mean the same to us
        raise ProtocolError(Reason.MALFORMED, f"not CBOR: {type(exc).__name__}") from None
    if stream.tell() != len(data):
        raise ProtocolError(Reason.MALFORMED, "trailing bytes after the message")
    return obj


def decode_as(cls: type[M], data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode a CBOR map straight into dataclass `cls` with the message rules, for objects that are not
    registered wire messages (no "t"/"v" envelope: they carry their own schema, e.g. ledger blocks)."""
    return _build(cls, load_cbor(data, max_bytes), cls.__name__)


def decode(data: bytes, expect: type[M] | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode one message; `expect` restricts the kind. Raises ProtocolError on anything unexpected."""
    obj = load_cbor(data, max_bytes)
    if type(obj) is not dict:
        raise ProtocolError(Reason.MALFORMED, "message is not a map")
    kind, version = obj.get("t"), obj.get("v")
    if type(kind) is not str or kind not in _REGISTRY:
        raise ProtocolError(Reason.WRONG_TYPE, f"unknown message type {str(kind)[:40]!r}")
    cls = _REGISTRY[kind]
    if expect is not None and cls is not expect:
        raise ProtocolError(Reason.WRONG_TYPE, f"expected {expect.KIND!r}, got {kind!r}")
    if type(version) is not int or version != cls.VERSION:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"{kind} schema version {version!r}, we speak {cls.VERSION}")
    return _build(cls, obj, kind, skip=("t", "v"))
