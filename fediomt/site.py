"""`fediomt site run DIR [DIR...]`: run provisioned site folders (`fediomt provision`) without systemd.

Each folder's site.toml says what it is: its broker (cloud and edges: `mosquitto -c broker/NAME.conf`, started
first, the command waits until it listens) and its daemon (`fediomt cloud|edge|device run --config ...`). All run
as child processes with their logs in DIR/state/logs/; SIGTERM or Ctrl-C stops them all. The command ends when
every daemon has ended, with the highest exit status among them (the cloud's 0 when its run completed, 4 when it
failed); `--only broker` runs the brokers alone until stopped (a daemon then runs with its own command).
Under systemd the units in DIR/systemd/ do the same (README.md in each folder).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import tomllib

from fediomt.processes import ProcessGroup


def _broker_argv(folder: Path, conf: Path) -> tuple[list[str], int]:
    from experiments.mosquitto import find_mosquitto

    text = conf.read_text()
    data = re.search(r"^persistence_location (.+)$", text, re.M)
    if data:
        Path(data.group(1).strip()).mkdir(parents=True, exist_ok=True)
    port = int(re.search(r"^listener (\d+)", text, re.M).group(1))
    if os.geteuid() == 0:   # as root Mosquitto would drop to its own user, which may not read the keys here
        run_conf = folder / "state" / "mosquitto-run.conf"
        run_conf.parent.mkdir(parents=True, exist_ok=True)
        run_conf.write_text("user root\n" + text)
        conf = run_conf
    return [find_mosquitto(), "-c", str(conf)], port


def _ledger_argv(folder: Path, env_file: Path) -> list[str]:
    """`fediomt ledger replica` as the unit runs it, from the site's ledger.env (KEY=VALUE lines)."""
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
    return ["ledger", "replica", str(folder / "state" / "ledger" / "ledger.db"), "--consortium",
            str(folder / "consortium.toml"), "--id", env["FEDIOMT_LEDGER_ID"], "--key", env["FEDIOMT_LEDGER_KEY"],
            "--host", env["FEDIOMT_LEDGER_HOST"], "--port", env["FEDIOMT_LEDGER_PORT"], "--pki", str(folder / "pki")]


def run(args: argparse.Namespace) -> int:
    from experiments.mosquitto import wait_for_port

    sites = []
    for folder in args.dirs:
        try:
            site = tomllib.loads((folder / "site.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            print(f"fediomt site: {folder} is not a provisioned site folder ({exc})", file=sys.stderr)
            return 2
        sites.append((folder, site))
    codes: dict[str, int] = {}
    with ProcessGroup(args.dirs[0] / "state" / "logs") as group:
        try:
            for folder, site in sites:
                if site.get("broker") and args.only in (None, "broker"):
                    argv, port = _broker_argv(folder, folder / site["broker"])
                    group.log_dir = folder / "state" / "logs"
                    group.start(f"broker-{site['id']}", argv)
                    wait_for_port(port, 15)
                    print(f"broker {site['id']} listening on {port}", flush=True)
            daemons = []
            if args.only in (None, "daemon"):
                for folder, site in sites:
                    group.log_dir = folder / "state" / "logs"
                    daemons.append(group.start(site["id"], [site["kind"], "run", "--config",
                                                            str(folder / site["config"])]))
                    print(f"{site['kind']} {site['id']} started (log {group.log_dir / site['id']}.log)", flush=True)
                    if site.get("ledger"):   # the edge's validator: it runs until the site stops
                        group.start(f"ledger-{site['id']}", _ledger_argv(folder, folder / site["ledger"]))
                        print(f"ledger validator {site['id']} started", flush=True)
            while True:
                for child in daemons:
                    if child.name not in codes and child.process.poll() is not None:
                        codes[child.name] = child.process.returncode
                        print(f"{child.name} exited with status {child.process.returncode}", flush=True)
                if daemons and len(codes) == len(daemons):
                    break
                if not daemons and any(c.process.poll() is not None for c in group.children):
                    print("a broker exited", file=sys.stderr)
                    return 1
                time.sleep(0.3)
        except KeyboardInterrupt:
            return 0
    return max(codes.values(), default=0)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("run", help="run provisioned site folders (broker + daemon) as child processes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="site folders written by `fediomt provision`")
    p.add_argument("--only", choices=("broker", "daemon"), help="start only the brokers, or only the daemons")
    p.set_defaults(func=run)
