"""`fediomt cloud run|check-config|new-run --config cloud.toml`: the cloud aggregator daemon (see docs/cloud.md,
configs/cloud.toml).

TensorFlow is imported only when the daemon starts, so `--help`, `check-config` and `new-run` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cloud.config import load_config
from protocol.logs import capture_native_output, event, setup
from protocol.tomlconfig import add_check_config, check_files, lock_dir

OUTPUTS = frozenset({"run_dir", "ledger.db"})   # written by the daemon


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    run = sub.add_parser("run", help="run the aggregator until its rounds are done, the budget is spent or SIGTERM",
                         description="Announce rounds, verify and combine edge aggregates with the configured "
                                     "strategy, account privacy, evaluate, checkpoint (resumes after a crash) and "
                                     "publish the global model. Config reference: configs/cloud.toml "
                                     "(`fediomt init-config cloud` writes one). Exit status: 0 completed or "
                                     "budget spent, 2 a bad config or file, 4 the run failed (a round closed "
                                     "with fewer than min_devices devices).")
    run.add_argument("--config", required=True, help="cloud TOML config (see configs/cloud.toml)")
    run.set_defaults(func=_run)
    add_check_config(sub, load_config, OUTPUTS)
    new = sub.add_parser("new-run", help="set the finished run aside (run_dir -> run_dir-RUNID) so that the next "
                                         "`cloud run` starts a new run, and clear the cloud's retained round and "
                                         "model and its queued session on its broker",
                         description="Stop the cloud daemon first.")
    new.add_argument("--config", required=True, help="cloud TOML config")
    new.add_argument("--offline", action="store_true", help="only run_dir: do not connect to the broker")
    new.set_defaults(func=_new_run)


def _run(args: argparse.Namespace) -> int:
    from cloud.aggregator import CloudAggregator
    from protocol.atomic import atomic_write

    cfg = load_config(args.config)
    check_files(cfg, OUTPUTS)
    lock = lock_dir(cfg.run_dir, "run_dir")  # noqa: F841 - held until the process exits
    log = setup("cloud", cfg.log_level)
    capture_native_output("cloud.runtime")   # TensorFlow's and LiteRT's start-up lines as JSON lines
    try:
        aggregator = CloudAggregator(cfg, log)
    except (OSError, ValueError) as exc:  # a key, data or checkpoint problem: say it, no traceback
        print(f"fediomt cloud: {exc}", file=sys.stderr)
        return 2
    atomic_write(Path(cfg.run_dir) / "config.toml", Path(args.config).read_bytes())
    aggregator.install_signal_handlers()
    status = aggregator.run()
    if aggregator.state.stop_reason:   # why it stopped, where the report is: an error when the run failed
        event(log, f"run {'failed' if status else 'ended'}: {aggregator.state.stop_reason}",
              logging.ERROR if status else logging.INFO, report=str(Path(cfg.run_dir) / "report.json"))
    return status


def previous_run_id(run_dir: Path) -> str:
    """The run id in run_dir's checkpoint ("" when there is none), read without the cloud's model code."""
    import numpy as np

    path = run_dir / "checkpoint.npz"
    if not path.exists():
        return ""
    with np.load(path, allow_pickle=False) as data:
        return str(json.loads(data["meta"].tobytes().decode()).get("run_id", ""))


def _new_run(args: argparse.Namespace) -> int:
    from protocol.mqtt import role_connection
    from protocol.runs import clear_broker, report_new_run
    from protocol.topics import CLOUD_MODEL, CLOUD_ROUND

    cfg = load_config(args.config)
    run_dir = Path(cfg.run_dir)
    out: dict = {"run_dir": str(run_dir), "ended_run": None, "moved_to": None}
    if run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()):
        lock = lock_dir(run_dir, "run_dir")   # refuses while the daemon runs
        ended = previous_run_id(run_dir) or time.strftime("%Y%m%dT%H%M%S")
        target = run_dir.with_name(f"{run_dir.name}-{ended}")
        n = 1
        while target.exists():
            target, n = run_dir.with_name(f"{run_dir.name}-{ended}.{n}"), n + 1
        lock.close()
        run_dir.rename(target)
        out.update(ended_run=ended, moved_to=str(target))
    clears = [lambda: clear_broker(cfg.broker, cfg.client_id, [CLOUD_ROUND, CLOUD_MODEL]),
              lambda: clear_broker(role_connection(cfg.broker, "secagg"), cfg.client_id + "-secagg", [])]
    return report_new_run(out, None if args.offline else clears, "fediomt cloud new-run", "run set aside")
