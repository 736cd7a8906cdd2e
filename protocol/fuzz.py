"""Fuzz targets for every network-facing decoder, and a runner that fuzzes one in a child process with atheris.

A target takes bytes, feeds them to a decoder, and checks what comes out. ProtocolError is the expected answer
to garbage; any other exception (or a broken invariant, or running out of time or memory) is a crash. The same
targets serve the hypothesis property tests, so they import nothing from atheris.

    python -m protocol.fuzz TARGET [libFuzzer flags] [corpus dirs]   # one target under atheris
    fuzz(TARGET, runs=...) -> {"inputs": ..., "crashes": ...}         # the same, from Python
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

from protocol import bundle, messages
from protocol.chunking import Reassembler, split_payload
from protocol.codec import registry
from protocol.compression import CompressionSettings, decode_sparse, decode_update, encode_update
from protocol.errors import ProtocolError
from protocol.signing import generate_signing_key, sign

# Modules that register more message kinds (secure aggregation); absent ones are reported by `message_kinds`.
OPTIONAL_MESSAGE_MODULES = ("protocol.secagg.messages",)
UPDATE_SIZES = (0, 1, 7, 64, 1000, 4096)
_BUNDLE_KEY = generate_signing_key()


def message_kinds() -> list[str]:
    """Every registered message kind, after importing the optional modules that register more."""
    for name in OPTIONAL_MESSAGE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return sorted(registry())


def target_messages(data: bytes) -> None:
    """protocol.messages.decode, either any kind or one expected kind (the first byte picks); a decoded message
    must survive encode -> decode unchanged, and its compression settings (if any) must parse or be refused."""
    if not data:
        return
    kinds = message_kinds()
    choice = data[0] % (len(kinds) + 1)
    expect = registry()[kinds[choice]] if choice < len(kinds) else None
    try:
        msg = messages.decode(data[1:], expect=expect)
    except ProtocolError:
        return
    assert messages.decode(messages.encode(msg)) == msg, "message does not round-trip"
    if isinstance(getattr(msg, "compression", None), dict):  # the settings parser is network-facing too
        try:
            CompressionSettings.from_dict(msg.compression)
        except ProtocolError:
            pass


def target_update(data: bytes) -> None:
    """decode_sparse / decode_update of an update payload for a model size the first byte picks."""
    if not data:
        return
    n = UPDATE_SIZES[data[0] % len(UPDATE_SIZES)]
    try:
        idx, values = decode_sparse(data[1:], n)
    except ProtocolError:
        return
    assert idx.dtype == np.int64 and values.dtype == np.float32 and idx.shape == values.shape
    assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < n and (np.diff(idx) > 0).all()), "bad indices"
    assert np.isfinite(values).all()
    dense = decode_update(data[1:], n)
    assert dense.shape == (n,) and np.array_equal(dense[idx], values)


def target_encode(data: bytes) -> None:
    """encode_update on arbitrary float32 deltas and settings: decode(payload) + residual == delta."""
    if len(data) < 3:
        return
    method = ("topk", "randk", "dense")[data[0] % 3]
    bits = (32, 8, 4)[data[1] % 3]
    density = (data[2] % 100 + 1) / 100
    raw = data[3:len(data) - len(data[3:]) % 4]
    delta = np.nan_to_num(np.frombuffer(raw, dtype="<f4"), posinf=0.0, neginf=0.0).astype(np.float32) % 1e6
    settings = CompressionSettings(method=method, density=density, bits=bits, block_size=8 << (data[2] % 4),
                                   stochastic=bool(data[1] & 8), seed=data[0] if data[0] & 16 else None,
                                   entropy=bool(data[0] & 32))
    payload, residual = encode_update(delta, settings, rng=np.random.default_rng(0))
    decoded = decode_update(payload, delta.shape[0])
    assert np.allclose(decoded + residual, delta, rtol=1e-5, atol=1e-3), "error feedback lost mass"


def target_chunks(data: bytes) -> None:
    """Reassembler under reordering, duplicates, tampering and expiry: whatever it returns is the payload."""
    if len(data) < 2:
        return
    size = 1 + data[0] % 16
    payload = data[2:2 + data[1]]
    ops = data[2 + data[1]:]
    chunks = split_payload(payload, size, b"T" * 16)
    r = Reassembler(timeout_s=100, max_total_bytes=1024, max_transfers=2)
    for i in range(0, len(ops) - 1, 2):
        op, arg = ops[i] % 5, ops[i + 1]
        c = chunks[arg % len(chunks)]
        if op == 1:
            c = messages.Chunk(c.transfer_id, c.index, c.total, c.total_size, c.sha256, bytes([arg]) + c.data[1:])
        elif op == 2:
            total = max(c.total, 1 + arg % 8)
            c = messages.Chunk(bytes([arg % 4]) * 16, arg % total, total, arg, c.sha256, c.data)
        elif op == 3:
            r.expire(now=float(arg))
            continue
        try:
            out = r.add(c, now=float(i))
        except ProtocolError:
            continue
        assert out is None or out == payload, "reassembled bytes differ from the payload"
        assert 0 <= r.buffered_bytes <= r.max_total_bytes and r.open_transfers <= r.max_transfers


def target_bundle(data: bytes) -> None:
    """protocol.bundle.unpack_files + verify_files; with the first byte odd the manifest is re-signed, so the
    manifest and hash checks behind the signature get fuzzed too (a buggy or compromised signer)."""
    if not data:
        return
    try:
        files = bundle.unpack_files(data[1:])
        if data[0] & 1:
            files[bundle.SIGNATURE_FILE] = sign(_BUNDLE_KEY, files[bundle.MANIFEST_FILE])
        bundle.verify_files(files, _BUNDLE_KEY.public_key())
    except ProtocolError:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "messages": target_messages,
    "update": target_update,
    "encode": target_encode,
    "chunks": target_chunks,
    "bundle": target_bundle,
}


def _head(major: int, n: int) -> bytes:
    """A CBOR item header (shortest form)."""
    if n < 24:
        return bytes([major << 5 | n])
    width = next(w for w in (1, 2, 4, 8) if n < 1 << (8 * w))
    return bytes([major << 5 | {1: 24, 2: 25, 4: 26, 8: 27}[width]]) + n.to_bytes(width, "big")


def hostile_cbor(size: int = 4 * 1024 * 1024) -> dict[str, bytes]:
    """Inputs of about `size` bytes built to make a CBOR decoder slow or big, each framed as an update message so
    that nothing but the structure refuses them."""
    frame, k = b"\x83\x66update\x02", size - 24  # [kind, version, body]
    keys = b"".join(_head(3, 4) + b"%04x" % (i % 65536) + b"\x00" for i in range(k // 6))
    return {name: frame + body for name, body in {
        "nested arrays": b"\x81" * k + b"\x80",
        "empty arrays": _head(4, k) + b"\x80" * k,
        "empty maps": _head(4, k) + b"\xa0" * k,
        "huge map": _head(5, k // 6) + keys,
        "small ints": _head(4, k // 3) + b"\x19\x01\x00" * (k // 3),
        "short texts": _head(4, k // 3) + b"\x62ab" * (k // 3),
        "long string": _head(3, k) + b"a" * k,
        "indefinite arrays": b"\x9f" * (k // 2) + b"\xff" * (k // 2),
        "length past the end": _head(2, 2**62),
        "map count past the end": _head(5, 2**62),
        "tags": b"\xc6" * k + b"\x00",
    }.items()}


def decode_cost(data: bytes, repeats: int = 3) -> dict:
    """CPU ms (the least of `repeats` runs: the intrinsic cost, not a busy machine's) and peak traced memory of
    protocol.messages.decode(data) (a separate run: tracemalloc slows the timed ones otherwise), and how it ended."""
    import tracemalloc

    def attempt() -> str:
        try:
            return type(messages.decode(data)).__name__
        except ProtocolError as exc:
            return str(exc)[:120]

    cpu_ms = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        outcome = attempt()
        cpu_ms = min(cpu_ms, (time.process_time() - start) * 1000)
    tracemalloc.start()
    try:
        attempt()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"bytes": len(data), "cpu_ms": round(cpu_ms, 2), "peak_bytes": peak, "outcome": outcome}


def seeds(name: str) -> list[bytes]:
    """Valid inputs to start a target from (mutating real structures reaches deeper than random bytes)."""
    if name == "messages":
        from protocol.samples import sample_messages

        kinds = message_kinds()
        samples = sample_messages()
        sampled = {m.KIND for m in samples}
        samples += [_minimal(registry()[k], {}) for k in kinds if k not in sampled]
        return [bytes([kinds.index(m.KIND)]) + messages.encode(m) for m in samples]
    if name == "update":
        rng = np.random.default_rng(1)
        out = []
        for i, n in enumerate(UPDATE_SIZES):
            delta = rng.standard_t(3, n).astype(np.float32)
            for s in (CompressionSettings(density=0.1, bits=4, entropy=False), CompressionSettings(density=0.5),
                      CompressionSettings(method="randk", seed=3, bits=32), CompressionSettings(method="dense")):
                out.append(bytes([i]) + encode_update(delta, s)[0])
        return out
    if name == "encode":
        return [bytes([0, 1, 9]) + np.linspace(-3, 3, 50, dtype=np.float32).tobytes()]
    if name == "chunks":
        return [bytes([3, 10]) + b"0123456789" + bytes(range(8)), bytes([0, 2, 7, 7, 0, 0, 0, 1])]
    if name == "bundle":
        manifest = {"name": "m", "version": 1, "kind": "trainable", "family": "mlp", "device_class": "wearable",
                    "layout": [{"name": "w", "shape": [2, 3]}], "input": {"shape": [3]}, "n_classes": 2,
                    "batch_sizes": {"train": 8}}
        files = bundle.seal(b"TFL3" + bytes(32), manifest, _BUNDLE_KEY)
        archive = cbor2.dumps({"format": bundle.ARCHIVE_FORMAT, **files})
        return [b"\0" + archive, b"\1" + archive]
    raise KeyError(name)


def _minimal(tp: Any, meta: dict) -> Any:
    """The smallest value of a schema type that its limits allow: a seed for kinds protocol.samples lacks."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _minimal(hints[f.name], dict(f.metadata)) for f in dataclasses.fields(tp)})
    if origin in (typing.Union, types.UnionType):
        return None if type(None) in args else _minimal(args[0], meta)
    if origin is list:
        return [_minimal(args[0], meta.get("items") or {})] if meta.get("min_len") else []
    if origin is dict:
        return {}
    low = meta.get("min_value") or 0
    size = meta.get("min_len") or 0
    return {int: int(low), float: float(low), bool: False, str: "a" * max(1, size), bytes: bytes(size)}[tp]


def fuzz(name: str, runs: int | None = None, max_total_time: int | None = None, max_len: int = 4096,
         artifacts: Path | None = None, timeout_s: float = 900) -> dict:
    """Fuzz one target in a child process; {"target", "inputs", "crashes", "seconds", "log"}.

    libFuzzer stops at the first crash, so `crashes` is 0 or 1; the crashing input is saved under `artifacts`.
    A slow input (> 10 s) or a process over 2 GB RSS counts as a crash: both are denial of service.
    """
    if importlib.util.find_spec("atheris") is None:
        raise RuntimeError("atheris is not installed (it comes with the dev extra: pip install 'fediomt[dev]')")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(seeds(name)):
            (corpus / f"seed{i}").write_bytes(seed)
        prefix = Path(artifacts or tmp)
        prefix.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", _CHILD, name, f"-max_len={max_len}", "-timeout=10",
               "-rss_limit_mb=2048", f"-artifact_prefix={prefix}/{name}-", "-print_final_stats=1", str(corpus)]
        cmd += [f"-runs={runs}"] if runs is not None else []
        cmd += [f"-max_total_time={max_total_time}"] if max_total_time is not None else []
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).parent.parent)
    log = proc.stdout + proc.stderr
    done = re.search(r"Done (\d+) runs", log) or re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    return {"target": name, "inputs": int(done.group(1)) if done else 0, "crashes": int(proc.returncode != 0),
            "seconds": round(time.monotonic() - start, 2), "log": log[-3000:] if proc.returncode else ""}


# The child imports the protocol package under atheris' import hook, so only protocol/* is instrumented for
# coverage (instrumenting every loaded module, numpy and cryptography included, takes most of a minute).
_CHILD = """
import sys, atheris
with atheris.instrument_imports(include=["protocol"]):
    import protocol.fuzz as f
    f.message_kinds()
f.run_child(sys.argv[1:])
"""


def run_child(argv: list[str]) -> None:
    import atheris

    atheris.Setup([sys.argv[0], *argv[1:]], TARGETS[argv[0]])
    atheris.Fuzz()


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TARGETS:
        raise SystemExit(f"usage: python -m protocol.fuzz {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    os.execv(sys.executable, [sys.executable, "-c", _CHILD, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
