"""`fediomt bench fuzz`: a longer atheris run of every network-facing decoder (protocol.fuzz.TARGETS).

Each target runs in its own child process for a fixed time (60 s, `--quick`: 500 inputs); the figures are the
inputs tried and the crashes found per target. Crashing inputs are saved under `<out>/fuzz-artifacts/`.
It also reports the worst decode cost of the hostile CBOR structures (protocol.fuzz.hostile_cbor, 4 MiB and
16 KiB): CPU ms and peak memory over max(input, 64 KiB), against issue 18's bound of 50 ms and 16x.
"""

from __future__ import annotations

import argparse

from protocol.codec import MEMORY_FLOOR
from protocol.fuzz import TARGETS, decode_cost, fuzz, hostile_cbor, message_kinds


def run(args: argparse.Namespace) -> dict:
    from protocol.table import print_table

    artifacts = args.out / "fuzz-artifacts"
    budget = {"runs": 500} if args.quick else {"max_total_time": 60}
    rows = []
    for name in TARGETS:
        result = fuzz(name, artifacts=artifacts, timeout_s=900, **budget)
        rows.append({k: result[k] for k in ("target", "inputs", "crashes", "seconds")})
        if result["crashes"]:
            print(result["log"])
    print_table(rows)
    costs = [{"input": f"{name} ({size} B)", **decode_cost(data)}
             for size in (4 * 1024 * 1024, 16 * 1024) for name, data in hostile_cbor(size).items()]
    worst = {"cpu_ms": max(c["cpu_ms"] for c in costs),
             "memory_ratio": round(max(c["peak_bytes"] / max(c["bytes"], MEMORY_FLOOR) for c in costs), 2)}
    print(f"hostile CBOR: worst decode {worst['cpu_ms']} ms CPU, {worst['memory_ratio']}x memory")
    return {"targets": rows, "hostile_decode": {"worst": worst, "inputs": costs},
            "message_kinds": message_kinds(), "inputs": sum(r["inputs"] for r in rows),
            "crashes": sum(r["crashes"] for r in rows), "budget": budget}
