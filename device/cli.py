"""`fediomt device run|status|new-run --config device.toml`, `fediomt device predict BUNDLE INPUT`: the on-device
agent (training or inference) and one-off inference (imports no TensorFlow)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from protocol.tomlconfig import ConfigError, check_files, lock_dir

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
  [ota]         enabled, device_class (default: the compute class), retry_s
  mode          "auto" (run what is installed: train a trainable bundle, infer with an int8 student, and switch
                when a student is pushed), "train" (refuse students), "infer" (never train; may start without a
                bundle and wait for a push)
  [inference]   input (file, FIFO or "-" = stdin; one window per line), follow, output (JSON lines file or "-"),
                publish (prediction topic), batch
"""


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    run_p = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT", epilog=HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run_p.add_argument("--config", type=Path, required=True, help="device TOML config file")
    run_p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="override the config's log_level")
    run_p.set_defaults(func=run)
    pred_p = sub.add_parser("predict", help="classify windows with a bundle once (JSON lines on stdout)",
                            description="INPUT: .npz (x, optional y: accuracy is reported), .npy, or text with one "
                                        "window per line (CSV, whitespace or JSON array), '-' = stdin")
    pred_p.add_argument("bundle", type=Path, help="bundle directory (int8 student or trainable)")
    pred_p.add_argument("input", help="windows: .npz / .npy / text file / FIFO / '-'")
    pred_p.add_argument("--pubkey", type=Path, required=True, help="bundle-signing public key (PEM)")
    pred_p.add_argument("--output", default="-", help="predictions file (JSON lines; default stdout, '' = none)")
    pred_p.add_argument("--threads", type=int, help="interpreter threads")
    pred_p.add_argument("--bench", type=int, default=0, metavar="N",
                        help="also time N single-window calls: latency per window (us) and peak RSS on stderr as JSON")
    pred_p.set_defaults(func=predict)
    status_p = sub.add_parser("status", help="print the device's local state (model, privacy spent) as JSON",
                              epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    status_p.add_argument("--config", type=Path, required=True, help="device TOML config file")
    status_p.set_defaults(func=status)
    new_p = sub.add_parser("new-run", help="forget the global model, rounds, residual and control variates before a "
                                           "new federation run, accept only later runs, clear the device's retained "
                                           "status and queued session on its broker; KEEP the privacy history (the "
                                           "lifetime budget)",
                           epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    new_p.add_argument("--config", type=Path, required=True, help="device TOML config file (the agent must be stopped)")
    new_p.add_argument("--offline", action="store_true", help="only the local state: do not connect to the broker")
    new_p.set_defaults(func=new_run)
    check_p = sub.add_parser("check-config", help="validate a config and the files it names; print it as TOML")
    check_p.add_argument("--config", required=True)
    check_p.set_defaults(func=_check_config)


OUTPUTS = frozenset({"state_dir", "bundle_dir", "inference.output"})   # written by the agent (or `fediomt flash`)


def _outputs(cfg) -> frozenset[str]:
    """Paths the agent does not need to exist: its state and bundles, and its training data in mode "infer"."""
    return OUTPUTS | {"data.dir"} if cfg.mode == "infer" else OUTPUTS


def _check_config(args: argparse.Namespace) -> int:
    from protocol.tomlconfig import to_toml

    cfg = _load_config(args.config)
    check_files(cfg, _outputs(cfg))
    print(to_toml(cfg), end="")
    return 0


def _load_config(path):
    from device.config import load_config

    cfg = load_config(path)
    if cfg.privacy.accountant == "pld":
        try:
            import dp_accounting  # noqa: F401 - the PLD accountant's package (it pulls SciPy)
        except ImportError:
            raise ConfigError(f"{path}: privacy.accountant = \"pld\" needs dp-accounting: pip install "
                              "'fediomt[pld]' (or use \"rdp\", which needs nothing more)") from None
    return cfg


def run(args: argparse.Namespace) -> int:
    from device.agent import DeviceAgent
    from device.inference import InferenceAgent
    from protocol import logs
    from protocol.errors import ProtocolError

    cfg = _load_config(args.config)
    check_files(cfg, _outputs(cfg))   # a missing key or data directory: one line, exit status 2 (no restart loop)
    lock = lock_dir(cfg.state_dir)  # noqa: F841 - two agents on one state_dir: the second refuses (exit 2)
    log = logs.setup(f"device.{cfg.id}", args.log_level or cfg.log_level)
    logs.capture_native_output(f"device.{cfg.id}.runtime")   # LiteRT's banner as a JSON line
    stop = threading.Event()  # handlers first: a SIGTERM while the interpreter loads is a clean stop too
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        try:
            agent = InferenceAgent(cfg, log) if _infers(cfg) else DeviceAgent(cfg, log)
        except ProtocolError as exc:  # e.g. a bundle that does not verify: refuse to start, say why
            logs.event(log, "refusing to start", logging.ERROR, reason=exc.reason.name, detail=exc.detail)
            return 3
        agent.stop = stop
        code = agent.run()
        if not getattr(agent, "switch_to_inference", False):
            return code
        logs.event(log, "switching to inference: an int8 student was installed")
    return 0


def _infers(cfg) -> bool:
    """Inference mode: `mode = "infer"`, or "auto" with an inference-only (int8) bundle installed."""
    from device.flash import CURRENT, PREVIOUS

    if cfg.mode != "auto":
        return cfg.mode == "infer"
    for name in (CURRENT, PREVIOUS):  # the kind only picks the agent; the agent verifies the bundle
        try:
            return json.loads((Path(cfg.bundle_dir) / name / "manifest.json").read_text()).get("kind") != "trainable"
        except (OSError, ValueError, AttributeError):
            continue
    return False


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
    from dataclasses import replace

    from device.config import load_config
    from device.state import STATE_FILE, load_state, save_state
    from protocol.runs import clear_broker, report_new_run
    from protocol.topics import status_topic

    cfg = load_config(args.config)
    lock = lock_dir(cfg.state_dir)  # noqa: F841 - refuses while the agent runs
    old = load_state(cfg.state_dir / STATE_FILE)
    fresh = old.for_new_run("")
    after = old.run_id or str(old.extra.get("after_run", ""))   # only runs later than the one ended are followed
    save_state(cfg.state_dir / STATE_FILE, replace(fresh, extra={**fresh.extra, "after_run": after}))
    out = {"device": cfg.id, "ended_run": old.run_id or None, "kept_history_entries": len(old.history),
           "forgot_rounds": len(old.seen_rounds), "forgot_model_version": old.model_version}
    clears = [lambda: clear_broker(cfg.broker, cfg.id, [status_topic(cfg.edge, cfg.id)])]
    return report_new_run(out, None if args.offline else clears, "fediomt device new-run", "state reset")


def predict(args: argparse.Namespace) -> int:
    import sys
    import time

    import numpy as np

    from device.inference import Predictor, classify, open_output, read_input
    from protocol.bundle import load_bundle
    from protocol.errors import ProtocolError
    from protocol.signing import load_public_key

    try:
        bundle = load_bundle(args.bundle, load_public_key(args.pubkey))
        predictor = Predictor(bundle, num_threads=args.threads)
        x, y, text = read_input(args.input)
        x = text(predictor.input_shape) if x is None else x
        predictions = classify(predictor, x) if len(x) else []
    except (ProtocolError, OSError, ValueError, KeyError) as exc:
        print(f"predict failed: {exc}", file=sys.stderr)
        return 1
    out = open_output(args.output)
    if out is not None:
        for p in predictions:
            out.write(json.dumps(p.as_dict()) + "\n")
        out.flush()
    summary = {"bundle": bundle.name, "version": bundle.version, "kind": bundle.manifest["kind"], "windows": len(x),
               "batch_latency_us": round(predictions[0].latency_us, 2) if predictions else None}
    if y is not None and len(x):
        summary["accuracy"] = round(float(np.mean(np.array([p.label for p in predictions]) == y)), 4)
    if args.bench and len(x):
        times = []
        for i in range(args.bench):
            row = x[i % len(x)][None]
            start = time.perf_counter()
            predictor.logits(row)
            times.append((time.perf_counter() - start) * 1e6)
        from device.runtime import interpreter_class

        summary.update(runtime=interpreter_class().__module__.split(".")[0], calls=args.bench,
                       latency_us_median=round(float(np.median(times)), 1),
                       latency_us_p95=round(float(np.percentile(times, 95)), 1),
                       peak_rss_mb=_peak_rss_mb(),
                       tensorflow_imported="tensorflow" in sys.modules)
    print(json.dumps(summary), file=sys.stderr)
    return 0


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss survives exec on Linux: a child of a big process reports the
    parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
