"""The `fediomt` command.

Subcommands are imported lazily, so `fediomt --help` and the device/edge commands never import TensorFlow.
Each subcommand module exposes `configure(parser)` (add its arguments, and sub-subcommands) and sets
`parser.set_defaults(func=...)`; `func(args)` returns the process exit status. A config file the command cannot
use (`protocol.tomlconfig.ConfigError`) ends it with one line on stderr and exit status 2, whatever the command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fediomt import __version__
from protocol.tomlconfig import ConfigError

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fediomt.demo", "run the whole federation locally: broker, cloud, 2 edges, 10 devices"),
    "device": ("device.cli", "on-device agent: DP-SGD in the TFLite interpreter, MQTT client"),
    "edge": ("edge.cli", "edge gateway daemon: validate, filter, aggregate, forward"),
    "cloud": ("cloud.cli", "cloud aggregator: strategies, accounting, global model"),
    "models": ("firmware_models.cli", "build, list and verify signed firmware model bundles"),
    "flash": ("fediomt.flash", "copy a verified model bundle onto a device (directory or user@host:/path)"),
    "push": ("cloud.push", "push a model bundle over MQTT to every device of a class (OTA)"),
    "experiment": ("experiments.cli", "reproduce the paper's evaluation (accuracy, communication, privacy, ...)"),
    "bench": ("fediomt.bench", "run a benchmark and print its figures (--list shows them)"),
    "ledger": ("ledger.cli", "verify and report the contribution ledger"),
    "pki": ("fediomt.pki", "consortium CA, device/edge/cloud certificates and signing keys"),
    "broker": ("fediomt.broker", "write Mosquitto configs (TLS, ACLs, bridge) for an edge or the cloud"),
    "provision": ("fediomt.provision", "one folder per site (certificates, keys, broker, config, units) from a "
                                       "consortium file"),
    "site": ("fediomt.site", "run provisioned site folders (broker + daemon) without systemd"),
    "init-config": ("fediomt.initconfig", "write a config with every default and the systemd units (pip installs)"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fediomt",
        description="Privacy-preserving federated learning on the Internet of Medical Things.",
        epilog=f"commands:\n{lines}\n\nRun `fediomt COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fediomt {__version__}")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        args = top.parse_args(argv)
        top.print_help()
        return 0 if args.command is None and argv else 2
    name = argv[0]
    if name not in COMMANDS:
        top.parse_args(argv[:1])  # prints the error with the valid choices and exits 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fediomt {name}", description=help_)
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"fediomt {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
