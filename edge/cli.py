"""`fediomt edge run --config edge.toml`: the edge gateway daemon (see docs/edge.md)."""

from __future__ import annotations

import argparse

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
    from edge.config import load_config
    from edge.gateway import Gateway

    cfg = load_config(args.config)
    log = setup("edge", cfg.log_level)
    gateway = Gateway(cfg, log)
    gateway.install_signal_handlers()
    return gateway.run()


def _check(args: argparse.Namespace) -> int:
    from edge.config import load_config

    print(load_config(args.config))
    return 0
