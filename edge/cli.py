"""`fediomt edge run --config edge.toml`: the edge gateway daemon (see docs/edge.md)."""

from __future__ import annotations

import argparse
import sys

import tomllib

from fediomt.logs import setup


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT",
                         description="Validate, filter and aggregate device updates; relay rounds and models; "
                                     "forward signed aggregates to the cloud. Config reference: configs/edge.toml.")
    run.add_argument("--config", required=True, help="edge TOML config (see configs/edge.toml)")
    run.set_defaults(func=_run)
    check = sub.add_parser("check-config", help="load and validate a config, print it and exit")
    check.add_argument("--config", required=True)
    check.set_defaults(func=_check)


def _run(args: argparse.Namespace) -> int:
    from edge.gateway import Gateway

    cfg = _load(args.config)
    if cfg is None:
        return 2
    log = setup("edge", cfg.log_level)
    try:
        gateway = Gateway(cfg, log)
    except (OSError, ValueError) as exc:  # keys or state directory unusable
        print(f"fediomt edge: cannot start: {exc}", file=sys.stderr)
        return 2
    gateway.install_signal_handlers()
    return gateway.run()


def _check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 2
    print(cfg)
    return 0


def _load(path: str):
    """The config, or None after a one-line error (a bad config is the operator's error, not a traceback)."""
    from edge.config import load_config

    try:
        return load_config(path)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"fediomt edge: {path}: {exc}", file=sys.stderr)
        return None
