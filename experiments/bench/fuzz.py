"""`fediomt bench fuzz`: a longer atheris run of every network-facing decoder (protocol.fuzz.TARGETS).

Each target runs in its own child process for a fixed time (60 s, `--quick`: 500 inputs); the figures are the
inputs tried and the crashes found per target. Crashing inputs are saved under `<out>/fuzz-artifacts/`.
"""

from __future__ import annotations

import argparse

from protocol.fuzz import TARGETS, fuzz, message_kinds


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
    return {"targets": rows, "message_kinds": message_kinds(), "inputs": sum(r["inputs"] for r in rows),
            "crashes": sum(r["crashes"] for r in rows), "budget": budget}
