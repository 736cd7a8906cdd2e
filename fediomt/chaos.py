"""`fediomt bench chaos`: random kill -9s of the edges, the cloud and the broker while a federation trains; then
every acknowledged update must be counted exactly once, every round must have one ledger block, the ledger must
verify, and accuracy must match an undisturbed run of the same length.

The federation is the demo's (fediomt.demo.prepare and commands: `watch`, 10 devices, 2 edges, the cloud, a ledger
replica per edge, each a `python -m fediomt ...` process) on a private Mosquitto with persistence (autosave every
second), provisioned the same way, without distillation. A seeded driver kills, at random intervals, one of: the
broker (kill -9, restarted on the same port from its persistence file), the cloud (kill -9, restarted from its
checkpoint), an edge host (its gateway and its ledger replica, kill -9), or drops a device (kill -9; it comes back
later). Each victim stays down for a random time, then restarts; it is not killed again before it is back on the
broker and `min_up_s` longer. Events come at random intervals, and at once while the edge/cloud/broker kills lag
behind `min_kills` spread evenly over the rounds, until the cloud has closed its rounds. While they lag, the
cloud is also frozen (SIGSTOP, a hung process: one more fault it must survive) until they catch up: on an idle
machine a round takes ~0.3 s, and the federation would otherwise finish before any victim is back to be killed
again. The broker is killed whenever it is drawn, the cloud frozen or down included: an edge's aggregate queued
for an absent cloud lives only in the broker's memory until its next autosave, so the kill loses it, and the edge
must resend it until the cloud's receipt (docs/protocol.md "Delivery of aggregates"; before receipts this lost 5
acknowledged updates in one run).

The checker reconciles, afterwards:
- acknowledged: every (device, round) for which a device logged an accepted Ack (`"msg": "ack"`, accepted true,
  in any of its incarnations' logs);
- counted: the device ids of every edge aggregate the cloud applied (rounds.jsonl's `device_ids`, per edge; those
  the edges' filters dropped are in `filtered_ids`): an acknowledged update is counted when its device appears in
  exactly one applied aggregate of its round; lost when in none (and not filtered), double when in more than one;
- applied but never acknowledged (a device killed before it logged the Ack): reported, not an error;
- ledger: one block per closed round (the cloud's ledger.db), `fediomt ledger verify --validators` exit 0;
- accuracy: the mean over the last 5 rounds, and the final round's, against the undisturbed run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from experiments.mosquitto import MosquittoBroker
from fediomt.demo import DemoSettings, commands, prepare
from fediomt.processes import Child, ProcessGroup
from protocol.table import print_table

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ChaosSettings:
    rounds: int = 40              # the cloud's rounds (every run)
    min_kills: int = 60           # edge/cloud/broker kills to spread over them (the driver cannot always keep up:
                                  # a victim must be back first; 60 gives >= 50 in practice)
    seed: int = 18
    interval_s: tuple[float, float] = (1.5, 6.0)   # between two events (uniform), or at once while the kills are
                                                   # behind min_kills spread evenly over the rounds
    min_up_s: float = 5.0         # a restarted victim is not killed again before it is back on the broker (its log
                                  # says "connected") and this long after (every restart must be able to make
                                  # progress, even on a loaded machine where the cloud's TensorFlow import is slow)
    down_s: tuple[float, float] = (0.5, 6.0)       # how long a killed edge, cloud or broker stays down
    device_down_s: tuple[float, float] = (2.0, 15.0)  # how long a dropped device stays away
    weights: tuple[tuple[str, float], ...] = (("broker", 1.0), ("cloud", 1.0), ("edge", 2.0), ("device", 1.0))
    max_down: int = 2             # at most this many edge/cloud/broker victims down at once
    round_timeout_s: float = 30.0
    timeout_s: float = 3600.0     # give up (a wedge) after this long
    undisturbed_runs: int = 2     # undisturbed runs of the same length: their spread is the noise


# ------------------------------------------------------------------------------------------------ the runs
def _kill(child: Child) -> None:
    try:
        os.killpg(child.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.process.wait()


def _demo_settings(s: ChaosSettings) -> DemoSettings:
    # every 20th model version in full: an edge that missed a delta while killed catches up at the next full one
    # (a device catches up from its edge at once; the demo itself sends only version 1 in full)
    return DemoSettings(dataset="watch", rounds=s.rounds, distill_steps=0, inference_wearables=False,
                        round_timeout_s=s.round_timeout_s, model_full_every=20)


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "cloud" / "run" / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_federation(s: ChaosSettings, run_dir: Path, chaos: bool) -> dict:
    """One federation; with `chaos` the driver kills and restarts processes until the cloud is done. Returns the
    driver's log of events and how the run ended."""
    rng = np.random.default_rng(s.seed)
    events: list[dict] = []
    unexpected: list[dict] = []
    start = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    with MosquittoBroker(workdir=run_dir / "broker") as broker, ProcessGroup(run_dir / "logs") as group:
        fed, configs = prepare(_demo_settings(s), run_dir, broker.port)
        argv = commands(fed, configs, run_dir, broker.port)
        procs = {name: group.start(name, args) for name, args in argv.items()}
        edges, devices = list(fed.edges), [c.id for c in fed.clients]
        down: dict[str, float] = {}   # victim -> restart time ("broker", "cloud", "edge-E", device ids)
        up_since: dict[str, float] = {}   # victim -> when it was back after its last restart
        starting = {v: (group.log_dir / f"{v}.log", 0) for v in ["cloud", *(f"edge-{e}" for e in edges), *devices]}
        # victim -> (its log, the log's size at its (re)start) until the log says it connected
        next_event = time.monotonic() + rng.uniform(*s.interval_s)
        outcome = "timeout"
        frozen = False   # the cloud SIGSTOPped while the kills lag behind the rounds

        def freeze(on: bool) -> None:
            nonlocal frozen
            if on != frozen:
                try:
                    os.killpg(procs["cloud"].process.pid, signal.SIGSTOP if on else signal.SIGCONT)
                except (ProcessLookupError, PermissionError):
                    pass
                frozen = on
                events.append({"t": round(time.monotonic() - start, 2), "event": "freeze" if on else "thaw",
                               "victim": "cloud"})

        def restart(victim: str) -> None:
            if victim == "broker":
                broker.start()
            else:
                log = group.log_dir / f"{victim}.log"
                starting[victim] = (log, log.stat().st_size if log.exists() else 0)
                for name in ([f"edge-{victim[5:]}", f"ledger-{victim[5:]}"] if victim.startswith("edge-")
                             else [victim]):
                    procs[name] = group.start(name, argv[name])
            up_since[victim] = time.monotonic()
            events.append({"t": round(time.monotonic() - start, 2), "event": "restart", "victim": victim})

        while time.monotonic() - start < s.timeout_s:
            now = time.monotonic()
            for victim in [v for v, t in down.items() if t <= now]:
                del down[victim]
                restart(victim)
            cloud = procs["cloud"]
            if "cloud" not in down and cloud.process.poll() is not None:
                if cloud.process.returncode == 0:
                    outcome = "completed"
                    break
                unexpected.append({"name": "cloud", "rc": cloud.process.returncode})
                outcome = f"cloud exited {cloud.process.returncode}"
                break
            for name, child in procs.items():   # a daemon that died by itself is a finding: note it, restart it
                victim = f"edge-{name[7:]}" if name.startswith("ledger-") else name
                if victim not in down and name != "cloud" and child.process.poll() is not None:
                    unexpected.append({"name": name, "rc": child.process.returncode,
                                       "t": round(now - start, 2)})
                    procs[name] = group.start(name, argv[name])
            kills = sum(e["event"] == "kill" and e["victim"] not in devices for e in events)
            done = len(_rounds(run_dir))
            behind = kills < min(s.min_kills, s.min_kills * (done + 1) / max(s.rounds - 1, 1))
            if chaos:
                freeze(behind and done < s.rounds and "cloud" not in down)
            if chaos and (now >= next_event or behind) and done < s.rounds:
                next_event = now + rng.uniform(*s.interval_s)
                names, weights = zip(*s.weights)
                kind = rng.choice(names, p=np.array(weights) / sum(weights))
                servers_down = sum(v not in devices for v in down)
                if kind == "device":
                    victim = str(rng.choice([d for d in devices if d not in down] or devices))
                else:
                    victim = "broker" if kind == "broker" else "cloud" if kind == "cloud" else \
                        f"edge-{rng.choice(edges)}"
                for v in (victim, "cloud"):
                    if v in starting:
                        log, offset = starting[v]
                        with open(log, "rb") as f:
                            f.seek(offset)
                            if b'"msg": "connected"' in f.read():
                                del starting[v]
                                up_since[v] = now
                if victim in down or victim in starting or (kind != "device" and servers_down >= s.max_down) \
                        or now - up_since.get(victim, -1e9) < s.min_up_s:
                    continue
                if victim == "broker":
                    broker.stop(signal.SIGKILL)
                elif victim.startswith("edge-"):
                    for name in (victim, f"ledger-{victim[5:]}"):
                        _kill(procs[name])
                else:
                    if victim == "cloud":
                        freeze(False)   # a frozen process dies of SIGKILL too; its restart runs free
                    _kill(procs[victim])
                low, high = s.device_down_s if kind == "device" else s.down_s
                down[victim] = time.monotonic() + rng.uniform(low, high)
                events.append({"t": round(time.monotonic() - start, 2), "event": "kill", "victim": victim,
                               "round": len(_rounds(run_dir)) + 1})
            time.sleep(0.1)
        freeze(False)
        for victim in list(down):    # bring everyone back for a clean stop (the broker for the replicas)
            if victim == "broker":
                broker.start()
        group.stop_all()
    return {"outcome": outcome, "events": events, "unexpected_exits": unexpected,
            "wall_s": round(time.monotonic() - start, 1), "edges": edges, "devices": devices}


# ------------------------------------------------------------------------------------------------ the checker
def acknowledged(log_dir: Path, devices: list[str], what: str = "ack") -> set[tuple[str, int]]:
    """(device, round) of every accepted Ack a device logged, over all its incarnations (`what="update sent"`:
    of every update it sent)."""
    acked = set()
    for device in devices:
        path = log_dir / f"{device}.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue   # a line cut by kill -9
            if isinstance(entry, dict) and entry.get("msg") == what and entry.get("accepted", True) is True:
                acked.add((device, int(entry["round"])))
    return acked


def ledger_rounds(db: Path) -> list[int]:
    from ledger.chain import Block
    from ledger.cli import raw_blocks

    return [Block.from_cbor(raw).round_id for raw in raw_blocks(db)] if db.exists() else []


def check(run_dir: Path, devices: list[str]) -> dict:
    records = _rounds(run_dir)
    acked = acknowledged(run_dir / "logs", devices)
    sent = acknowledged(run_dir / "logs", devices, "update sent")
    counted: Counter = Counter()
    filtered: set[tuple[str, int]] = set()
    for r in records:
        for ids in r.get("device_ids", {}).values():
            counted.update((d, r["round"]) for d in ids)
        for ids in r.get("filtered_ids", {}).values():
            filtered.update((d, r["round"]) for d in ids)
    lost = sorted(k for k in acked if counted[k] == 0 and k not in filtered)
    double = sorted(k for k in set(acked) | set(counted) if counted[k] > 1)
    unacked_counted = sorted(k for k in counted if k not in acked)
    closed = [r["round"] for r in records]
    blocks = [b for b in ledger_rounds(run_dir / "ledger.db") if b >= 0]
    verify = subprocess.run([sys.executable, "-m", "fediomt", "ledger", "verify", str(run_dir / "ledger.db"),
                             "--validators", str(run_dir / "consortium.toml")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    return {
        "rounds": len(records), "rounds_in_order": closed == list(range(1, len(closed) + 1)),
        # sent but never acknowledged (the edge or the broker lost it, the round closed first): no promise was made
        "updates_sent": len(sent), "sent_not_acked": len(sent - acked),
        "updates_acked": len(acked), "updates_counted": sum(1 for k in acked if counted[k] == 1),
        "updates_filtered": sum(1 for k in acked if k in filtered and counted[k] == 0),
        "updates_lost": len(lost), "updates_double": len(double), "lost": lost[:50], "double": double[:50],
        "counted_without_logged_ack": len(unacked_counted),
        "ledger_blocks": len(blocks), "rounds_without_block": sorted(set(closed) - set(blocks)),
        "blocks_per_round_max": max(Counter(blocks).values(), default=0),
        "ledger_verify": verify.returncode == 0, "ledger_verify_output": (verify.stdout + verify.stderr)[-300:],
        "final_accuracy": accs[-1] if accs else None,
        "accuracy_last5": round(float(np.mean(accs[-5:])), 4) if accs else None,
        "accuracy": accs,
        "devices_per_round": [r.get("num_devices", 0) for r in records],
        "edges_per_round": [r.get("num_edges", 0) for r in records],
    }


# ------------------------------------------------------------------------------------------------ the bench
def settings_for(quick: bool) -> ChaosSettings:
    return replace(ChaosSettings(), rounds=12, min_kills=10, undisturbed_runs=1) if quick else ChaosSettings()


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    s = settings_for(args.quick)
    out = Path(args.out) / "chaos"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {}
    names = [f"undisturbed{i + 1}" if s.undisturbed_runs > 1 else "undisturbed" for i in range(s.undisturbed_runs)]
    for name in [*names, "chaos"]:
        run_dir = out / f"{name}-{stamp}"
        print(f"{name}: {s.rounds} rounds -> {run_dir}", flush=True)
        driver = run_federation(s, run_dir, name == "chaos")
        runs[name] = {**driver, **check(run_dir, driver["devices"]), "run_dir": str(run_dir)}
    c = runs["chaos"]
    calm = [runs[n]["accuracy_last5"] for n in names if runs[n]["accuracy_last5"] is not None]
    kills = _group_kills(Counter("edge" if e["victim"].startswith("edge-") else e["victim"] for e in c["events"]
                                 if e["event"] == "kill"))
    rows = []
    for name in [*names, "chaos"]:
        r = runs[name]
        rows.append({"run": name, "outcome": r["outcome"], "rounds": r["rounds"], "blocks": r["ledger_blocks"],
                     "verify": "ok" if r["ledger_verify"] else "FAILED", "acked": r["updates_acked"],
                     "counted": r["updates_counted"], "filtered": r["updates_filtered"], "lost": r["updates_lost"],
                     "double": r["updates_double"], "acc_final": r["final_accuracy"],
                     "acc_last5": r["accuracy_last5"], "wall_s": r["wall_s"]})
    print_table(rows)
    away = broker_kills_with_cloud_away(c["events"])
    print(f"kills: {kills} (edge/cloud/broker: {kills['broker'] + kills['cloud'] + kills['edge']}; broker kills "
          f"while the cloud was frozen or down: {away}); unexpected exits: {len(c['unexpected_exits'])}")
    figures = {
        "settings": asdict(s), "kills": kills, "broker_kills_cloud_away": away,
        "server_kills": kills["broker"] + kills["cloud"] + kills["edge"],
        "ok": (c["outcome"] == "completed" and c["updates_lost"] == 0 and c["updates_double"] == 0
               and not c["rounds_without_block"] and c["blocks_per_round_max"] <= 1 and c["ledger_verify"]),
        # the undisturbed runs' mean minus the chaos run's (last 5 rounds), next to the undisturbed runs' own range
        "accuracy_gap_last5": (round(float(np.mean(calm)) - c["accuracy_last5"], 4)
                               if calm and c["accuracy_last5"] is not None else None),
        "undisturbed_range_last5": [min(calm), max(calm)] if calm else None,
        "runs": runs,
    }
    _plot(runs, out / "chaos.png")
    return figures


def broker_kills_with_cloud_away(events: list[dict]) -> int:
    """Broker kills while the cloud was frozen or down: those lose an aggregate queued for the cloud in the broker's
    memory, which the edge must resend until the cloud's receipt."""
    frozen = down = False
    n = 0
    for e in events:
        if e["victim"] == "cloud":
            frozen = e["event"] == "freeze" or (frozen and e["event"] not in ("thaw", "kill"))
            down = e["event"] == "kill" or (down and e["event"] != "restart")
        elif e["victim"] == "broker" and e["event"] == "kill":
            n += frozen or down
    return n


def _group_kills(kills: Counter) -> dict:
    out = {"broker": 0, "cloud": 0, "edge": 0, "device": 0}
    for victim, n in kills.items():
        out[victim if victim in out else "device"] += n
    return out


def _plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        ax1.plot(range(1, len(r["accuracy"]) + 1), r["accuracy"], marker=".", label=name)
    ax1.set(xlabel="round", ylabel="test accuracy", title="accuracy: chaos vs undisturbed")
    ax1.legend()
    colours = {"broker": "C3", "cloud": "C0", "edge": "C2", "device": "C7"}
    for e in runs["chaos"]["events"]:
        if e["event"] == "kill":
            kind = "edge" if e["victim"].startswith("edge-") else e["victim"] if e["victim"] in colours else "device"
            ax2.scatter(e["t"], list(colours).index(kind), color=colours[kind], marker="x")
    ax2.set(xlabel="seconds", yticks=range(len(colours)), yticklabels=list(colours), title="kill -9 events")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
