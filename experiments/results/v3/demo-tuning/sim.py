"""The demo's federation in the simulator, on watch's VALIDATION split: candidate demo settings scored without
touching the test set (issue 15 demo targets).

`Candidate` is the part of fediomt/demo.py's Candidate that this tuning varied, with the values the demo ships
(the tuning's result); this record sits in the experiments layer, which does not import the CLI layer. The
results.jsonl lines up to the "B_b128_lr4_s012" run (which closed the batch-size search that set the current
defaults) record their changes against the previous defaults (noise_mult 2.02, lr 0.5, batch_size 32).

Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/demo-tuning/sim.py NAME SEEDS KEY=VALUE ...
KEYs are Candidate fields (rounds, noise_mult, lr, lr_floor, bits, density, forward_bits, model_density,
model_bits, model_full_every, clip, local_epochs, calibrate=true|false, device_epsilon), opt.NAME=JSON (a cloud
[strategy] option), model.NAME=JSON (a firmware model option, e.g. model.filters=24) or filters=none|a,b.
Prints, per seed, the final and last-5-round validation accuracy,
the device epsilon of the demo's smallest device, and the bytes the demo would move over every link (device
updates up, edge aggregates up, model + announcement down to the demo's 10 addressed devices and 2 edges; acks and
statuses not counted, as the demo's byte_totals does not count them), and appends one JSON line to results.jsonl.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from edge.aggregate import FilterConfig
from experiments.datasets import load
from experiments.sim.harness import simulator
from experiments.sim.methods import Method

DENSE_PER_ROUND = 23_932_624 / 80    # a real demo's dense FedAvg bytes per round, every link (report.json)
DEMO_FILTERS = ["collusion", "norm", "cosine"]   # fediomt/demo.py DEMO_FILTERS: the norm filter on its z-score
DEMO_FILTER_PARAMS = {"norm": {"min_ratio": 0.0}}   # alone (before the collusion check: ["norm", "cosine"], OR-ed;
                                                    # identical results under the demo's DP, calibrate.jsonl)
ADDRESSED = 12                       # the demo's 8 trainers + 2 inference wearables + 2 edges get every model


@dataclass(frozen=True)
class Candidate:
    rounds: int = 80
    noise_mult: float = 3.83
    clip: float = 3.0
    lr: float = 3.0
    lr_floor: float = 0.1
    local_epochs: int = 1
    batch_size: int = 128
    density: float = 0.5
    bits: int = 4
    model_encoding: str = "delta"
    model_density: float = 0.1
    model_bits: int = 4
    model_full_every: int = 0     # 0: only version 1 in full
    forward_bits: int = 4
    public_subjects: int = 2
    calibrate: bool = False       # the cloud's [privacy] calibrate: each device lowers noise_mult to its own
    device_epsilon: float = 10.0  # least that keeps it within this over the run


def method_for(s: Candidate, options: dict | None = None, filters: list[str] | None = None,
               filter_params: dict | None = None) -> Method:
    """The demo's cloud [strategy], device compression, edge filters and forward, and downlink as a Method;
    `options` adds strategy options, `filters` replaces the edges' filters, `filter_params` their parameters."""
    up = ({"method": "dense", "bits": s.bits} if s.density >= 1 else
          {"method": "topk", "density": s.density, "bits": s.bits})
    return Method("demo", "fediomt", {"lr_decay_rounds": s.rounds, "lr_floor": s.lr_floor, **(options or {})}, up,
                  FilterConfig(enabled=DEMO_FILTERS if filters is None else filters, action="drop", min_updates=4,
                               params=filter_params or (DEMO_FILTER_PARAMS if filters is None else {})),
                  partial_work=True,
                  forward_compression={"method": "dense", "bits": s.forward_bits}, downlink=s.model_encoding,
                  downlink_compression={"method": "topk", "density": s.model_density, "bits": s.model_bits},
                  full_every=s.model_full_every or s.rounds + 1)


def run(s: Candidate, seed: int, options: dict | None = None, filters: list[str] | None = None,
        model: dict | None = None, filter_params: dict | None = None) -> dict:
    fed = load("watch")
    fed.model_options = {**fed.model_options, **(model or {})}
    fed.clients = fed.clients[s.public_subjects:]          # the demo's consented public subjects stay out
    smallest = min(len(c.x) for c in fed.clients)          # the demo's devices hold every row
    fed = fed.validation_split(0.15, 0)
    sim = simulator(fed, method_for(s, options, filters, filter_params), seed, rounds=s.rounds, lr=s.lr,
                    local_epochs=s.local_epochs, clip=s.clip, noise_mult=s.noise_mult, batch_size=s.batch_size,
                    device_epsilon=s.device_epsilon if s.calibrate else 0.0)
    sizes = {"up": 0, "fwd": 0, "down": 0}
    train, edge_round, run_round = sim._train, sim._edge_round, sim.run_round

    def _train(*a, **k):
        data, steps = train(*a, **k)
        sizes["up"] += len(data)
        return data, steps

    def _edge_round(*a, **k):
        out = edge_round(*a, **k)
        sizes["fwd"] += len(out[0])
        return out

    def _run_round():
        sizes["down"] += (len(sim.cloud.model_payload) + len(sim.cloud.announcement_payload)) * ADDRESSED
        return run_round()

    sim._train, sim._edge_round, sim.run_round = _train, _edge_round, _run_round
    t0 = time.monotonic()
    logs = sim.run()
    acc = [x.accuracy for x in logs if x.accuracy is not None]
    total = sum(sizes.values())
    return {"seed": seed, "final": acc[-1], "last5": float(np.mean(acc[-5:])), "rounds": len(logs),
            "epsilon": device_epsilon(s, smallest), **sizes, "total": total,
            "ratio": DENSE_PER_ROUND * len(logs) / total, "wall_s": round(time.monotonic() - t0, 1)}


def device_epsilon(s: Candidate, n: int) -> float:
    """The cloud's derivation for the smallest device (cloud.accounting.device_event, round by round as
    cloud.rounds.account_round composes it; the lr does not enter it)."""
    from cloud.accounting import PrivacyLedger, device_event
    from protocol.messages import TrainingPlan

    plan = TrainingPlan(lr=s.lr, local_epochs=s.local_epochs, batch_size=s.batch_size, clip=s.clip,
                        noise_mult=s.noise_mult, target_epsilon=s.device_epsilon if s.calibrate else 0.0,
                        target_delta=1e-5, rounds_left=s.rounds)
    history: list = []
    for r in range(s.rounds):
        history.append(device_event(replace(plan, rounds_left=s.rounds - r), n, history))
    return float(PrivacyLedger(device=history).report("rdp", None, None)["device"])


def main() -> None:
    name, seeds = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    types = {f.name: f.type for f in fields(Candidate)}
    changes, options, model, filters = {}, {}, {}, None
    for kv in sys.argv[3:]:
        k, v = kv.split("=", 1)
        if k.startswith("opt."):          # a cloud [strategy] option, JSON: opt.adaptive_lr=false
            options[k[4:]] = json.loads(v)
        elif k.startswith("model."):      # a firmware model option, JSON: model.filters=24
            model[k[6:]] = json.loads(v)
        elif k == "filters":              # the edges' filters: filters=none | filters=norm,cosine
            filters = [] if v == "none" else v.split(",")
        else:
            changes[k] = json.loads(v) if types[k] is bool else types[k](v)   # field types are the classes
    s = replace(Candidate(), **changes)
    rows = []
    for seed in seeds:
        r = run(s, seed, options, filters, model)
        rows.append(r)
        print(name, json.dumps(r), flush=True)
    summary = {"name": name, "changes": changes, "settings": asdict(s), "options": options, "model": model,
               "filters": filters,
               "final_mean": float(np.mean([r["final"] for r in rows])),
               "last5_mean": float(np.mean([r["last5"] for r in rows])), "epsilon": rows[0]["epsilon"],
               "total_mean": float(np.mean([r["total"] for r in rows])),
               "ratio_mean": float(np.mean([r["ratio"] for r in rows])), "runs": rows}
    print("SUMMARY", name, f"final {summary['final_mean']:.4f} last5 {summary['last5_mean']:.4f} eps "
          f"{summary['epsilon']:.3f} MB {summary['total_mean'] / 1e6:.3f} ratio {summary['ratio_mean']:.2f}",
          flush=True)
    with open(Path(__file__).with_name("results.jsonl"), "a") as f:
        f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
