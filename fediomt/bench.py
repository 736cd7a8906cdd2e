"""`fediomt bench NAME`: benchmarks are a product feature (what can my Pi do?).

A benchmark is a function `run(args) -> dict` in a module listed in BENCHMARKS; it prints its own table with
`protocol.table.print_table` and may write plots into `args.out`. This shell writes `<out>/<name>.json` and,
with `--json`, ends the output with ONE line holding the JSON object of the figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

# name -> ("module:function", description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "codec": ("experiments.bench.codec:run", "update compression: bytes vs dense fp32, encode/decode speed"),
    "train-step": ("experiments.bench.train_step:run", "DP-SGD step latency in LiteRT vs tf.function, RSS, sizes"),
    "device": ("experiments.bench.device:run", "one device agent process over 10 rounds: RSS, CPU, bytes"),
    "edge": ("experiments.bench.edge:run", "edge updates/s: decode, validate, filter, aggregate vs NumPy floor"),
    "secagg": ("experiments.bench.secagg:run", "secure aggregation cost: device compute/bytes, edge unmasking"),
    "distill": ("experiments.bench.distill:run", "int8 student vs teacher: size, agreement, latency, OTA push"),
    "fuzz": ("experiments.bench.fuzz:run", "long fuzz run of every network-facing decoder"),
    "ledger": ("experiments.bench.ledger:run", "ledger: Shapley accuracy vs cost, append/verify/replication speed"),
    "chaos": ("fediomt.chaos:run", "kill -9 edges, cloud, broker, devices: nothing lost or double counted"),
    "arm": ("experiments.bench.arm:run", "device tier on emulated aarch64 (qemu-system cortex-a72): install, DP-SGD, "
                                         "rounds with an x86 edge, weights vs x86"),
}


def load(name: str):
    target, _ = BENCHMARKS[name]
    module_name, func = target.split(":")
    return getattr(importlib.import_module(module_name), func)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", choices=list(BENCHMARKS), help="benchmark to run")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--json", action="store_true", help="end the output with one line of JSON figures")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster version (used by the tests)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for JSON and plots")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for name, (_, description) in BENCHMARKS.items():
            print(f"{name:<11} {description}")
        return 0 if args.list else 2
    args.out.mkdir(parents=True, exist_ok=True)
    figures = load(args.name)(args)
    (args.out / f"{args.name}.json").write_text(json.dumps(figures, indent=2, default=float) + "\n")
    if args.json:
        print(json.dumps(figures, default=float))
    return 0
