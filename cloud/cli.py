"""`fediomt cloud run --config cloud.toml`: the cloud aggregator daemon (see docs/cloud.md, configs/cloud.toml).

TensorFlow is imported only when the daemon starts, so `--help` and `check-config` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cloud.config import load_config
from protocol.logs import setup
from protocol.tomlconfig import add_check_config


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    run = sub.add_parser("run", help="run the aggregator until its rounds are done, the budget is spent or SIGTERM",
                         description="Announce rounds, verify and combine edge aggregates with the configured "
                                     "strategy, account privacy, evaluate, checkpoint (resumes after a crash) and "
                                     "publish the global model. Config reference: configs/cloud.toml.")
    run.add_argument("--config", required=True, help="cloud TOML config (see configs/cloud.toml)")
    run.set_defaults(func=_run)
    add_check_config(sub, load_config)


def _run(args: argparse.Namespace) -> int:
    from cloud.aggregator import CloudAggregator
    from protocol.atomic import atomic_write

    cfg = load_config(args.config)
    log = setup("cloud", cfg.log_level)
    try:
        aggregator = CloudAggregator(cfg, log)
    except (OSError, ValueError) as exc:  # a key, data or checkpoint problem: say it, no traceback
        print(f"fediomt cloud: {exc}", file=sys.stderr)
        return 2
    atomic_write(Path(cfg.run_dir) / "config.toml", Path(args.config).read_bytes())
    aggregator.install_signal_handlers()
    status = aggregator.run()
    if aggregator.state.stop_reason:
        print(f"fediomt cloud: {aggregator.state.stop_reason} (report: {Path(cfg.run_dir) / 'report.json'})",
              file=sys.stderr)
    return status
