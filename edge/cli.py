"""`fediomt edge run --config edge.toml`: the edge gateway daemon (see docs/edge.md)."""

from __future__ import annotations

import argparse
import sys

from edge.config import load_config
from protocol.logs import setup
from protocol.tomlconfig import add_check_config


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT",
                         description="Validate, filter and aggregate device updates; relay rounds and models; "
                                     "forward signed aggregates to the cloud. Config reference: configs/edge.toml.")
    run.add_argument("--config", required=True, help="edge TOML config (see configs/edge.toml)")
    run.set_defaults(func=_run)
    add_check_config(sub, load_config)


def _run(args: argparse.Namespace) -> int:
    from edge.gateway import Gateway

    cfg = load_config(args.config)
    log = setup("edge", cfg.log_level)
    try:
        gateway = Gateway(cfg, log)
    except (OSError, ValueError) as exc:  # keys or state directory unusable
        print(f"fediomt edge: cannot start: {exc}", file=sys.stderr)
        return 2
    gateway.install_signal_handlers()
    return gateway.run()
