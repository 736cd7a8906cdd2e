"""`fediomt edge run|check-config|new-run --config edge.toml`: the edge gateway daemon (see docs/edge.md)."""

from __future__ import annotations

import argparse
import sys

from edge.config import load_config
from protocol.logs import capture_native_output, setup
from protocol.tomlconfig import add_check_config, check_files, lock_dir

OUTPUTS = frozenset({"state_dir"})   # created by the daemon; every other path the config names must exist


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT",
                         description="Validate, filter and aggregate device updates; relay rounds and models; "
                                     "forward signed aggregates to the cloud. Config reference: configs/edge.toml "
                                     "(`fediomt init-config edge` writes one).")
    run.add_argument("--config", required=True, help="edge TOML config (see configs/edge.toml)")
    run.set_defaults(func=_run)
    add_check_config(sub, load_config, OUTPUTS)
    new = sub.add_parser("new-run", help="end the run followed so far: forget its rounds, updates and unsent "
                                         "aggregates, accept only later runs, clear the edge's retained round and "
                                         "model and its queued session on its broker(s)",
                         description="Stop the edge daemon first. Device statuses are kept.")
    new.add_argument("--config", required=True, help="edge TOML config")
    new.add_argument("--offline", action="store_true", help="only the local state: do not connect to the broker")
    new.set_defaults(func=_new_run)


def _run(args: argparse.Namespace) -> int:
    from edge.gateway import Gateway

    cfg = load_config(args.config)
    check_files(cfg, OUTPUTS)
    lock = lock_dir(cfg.state_dir)  # noqa: F841 - held until the process exits
    log = setup("edge", cfg.log_level)
    capture_native_output("edge.runtime")
    try:
        gateway = Gateway(cfg, log)
    except (OSError, ValueError) as exc:  # keys or state directory unusable
        print(f"fediomt edge: cannot start: {exc}", file=sys.stderr)
        return 2
    gateway.install_signal_handlers()
    return gateway.run()


def _new_run(args: argparse.Namespace) -> int:
    from edge.store import Store
    from protocol.runs import clear_broker, report_new_run
    from protocol.topics import model_full_topic, model_topic, round_topic

    cfg = load_config(args.config)
    lock = lock_dir(cfg.state_dir)  # noqa: F841 - refuses while the daemon runs
    store = Store(cfg.state_dir / "edge.db", cfg.synchronous)
    ended = store.end_run()
    store.close()
    out: dict = {"edge": cfg.edge_id, "ended_run": ended or None, "state": "forgotten"}
    client_id = f"fediomt-edge-{cfg.edge_id}-{cfg.replica}"   # edge.gateway's
    own = [round_topic(cfg.edge_id), model_topic(cfg.edge_id), model_full_topic(cfg.edge_id)]
    clears = [lambda: clear_broker(cfg.broker, client_id, own)]
    if cfg.cloud is not None:
        clears.append(lambda: clear_broker(cfg.cloud, client_id + "-cloud", []))
    return report_new_run(out, None if args.offline else clears, "fediomt edge new-run", "state forgotten")
