"""`fediomt device run|status --config device.toml`: the on-device agent (imports no TensorFlow)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

HELP = """\
The config file (TOML; every key and its default is documented in configs/device.toml and docs/device.md):
  id, edge               this device's id and its edge gateway's id ([A-Za-z0-9_-]{1,64})
  state_dir              weights, error-feedback residual, privacy ledger (written atomically)
  bundle_dir             installed model bundle (bundle_dir/current, as `fediomt flash` writes it)
  bundle_pubkey          Ed25519 public key that signs bundles
  cloud_pubkey           Ed25519 public key that signs rounds and global models
  signing_key            this device's Ed25519 private key (signs its updates)
  significance_threshold skip (send a tiny status) when the noised update's L2 norm is below this
  min_steps, deadline_margin_s, threads, log_level
  [data]        dir (train.npz: x, y / train.csv: features + label) or entry_point "module:function"
  [capability]  compute_class (wearable|phone|pi|server), memory_mb, bandwidth_bps, steps_per_s
  [privacy]     epsilon, delta, accountant (rdp|pld): the device refuses rounds beyond this budget
  [broker]      host, port, ca, cert, key, username, password, keepalive, session_expiry_s,
                reconnect_min_s, reconnect_max_s, max_message_bytes
"""


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    run_p = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT", epilog=HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run_p.add_argument("--config", type=Path, required=True, help="device TOML config file")
    run_p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="override the config's log_level")
    run_p.set_defaults(func=run)
    status_p = sub.add_parser("status", help="print the device's local state (model, privacy spent) as JSON",
                              epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    status_p.add_argument("--config", type=Path, required=True, help="device TOML config file")
    status_p.set_defaults(func=status)
    new_p = sub.add_parser("new-run", help="forget the global model, rounds, residual and control variates before a "
                                           "new federation run; KEEP the privacy history (the lifetime budget)",
                           epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    new_p.add_argument("--config", type=Path, required=True, help="device TOML config file (the agent must be stopped)")
    new_p.set_defaults(func=new_run)


def run(args: argparse.Namespace) -> int:
    from device.agent import DeviceAgent
    from device.config import load_config
    from protocol import logs
    from protocol.errors import ProtocolError

    cfg = load_config(args.config)
    log = logs.setup(f"device.{cfg.id}", args.log_level or cfg.log_level)
    stop = threading.Event()  # handlers first: a SIGTERM while the interpreter loads is a clean stop too
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent = DeviceAgent(cfg, log)
    except ProtocolError as exc:  # e.g. a bundle that does not verify: refuse to start, say why
        logs.event(log, "refusing to start", logging.ERROR, reason=exc.reason.name, detail=exc.detail)
        return 3
    agent.stop = stop
    return agent.run()


def status(args: argparse.Namespace) -> int:
    from device.config import load_config
    from device.state import STATE_FILE, load_state
    from protocol import accountant

    cfg = load_config(args.config)
    state = load_state(cfg.state_dir / STATE_FILE)
    p = cfg.privacy
    print(json.dumps({
        "device": cfg.id, "edge": cfg.edge, "model": state.model_name, "model_version": state.model_version,
        "rounds_answered": len(state.seen_rounds), "rounds_trained": len(state.history),
        "epsilon_spent": accountant.epsilon(state.history, p.delta, p.accountant), "epsilon_budget": p.epsilon,
        "delta": p.delta, "accountant": p.accountant, "steps_per_s": state.steps_per_s, **state.extra,
    }, indent=2))
    return 0


def new_run(args: argparse.Namespace) -> int:
    from device.config import load_config
    from device.state import STATE_FILE, DeviceState, load_state, save_state

    cfg = load_config(args.config)
    old = load_state(cfg.state_dir / STATE_FILE)
    save_state(cfg.state_dir / STATE_FILE, DeviceState(history=old.history, extra=old.extra))
    print(json.dumps({"device": cfg.id, "kept_history_entries": len(old.history), "forgot_rounds": len(old.seen_rounds),
                      "forgot_model_version": old.model_version}))
    return 0
