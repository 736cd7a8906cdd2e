"""Where FedIoMT loses to FedAvg / FedProx on the tabular tasks (issue 15, "FedIoMT >= every method"): each dataset's
tuned FedIoMT with one thing changed, beside the tuned winners, on the tuning's own 3 validation draws (the test set
is not touched). Score: tune.score (AUROC, last 5 rounds), mean over the draws.

Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/fediomt-tabular/ablation.py DATASET [VARIANT,...]
Appends one JSON line per variant to results.jsonl here.
"""
import json
import sys
from pathlib import Path

import numpy as np

from edge.aggregate import FilterConfig
from edge.bounds import BoundsConfig
from experiments.accuracy import NO_CLIP
from experiments.sim.harness import RECIPES, dataset, simulate
from experiments.sim.methods import DENSE
from experiments.tune import load_tuned, method_with, score

TUNED = {"heart": "experiments/results/v3/tune-heart-3seeds/tune.json",
         "physionet2012": "experiments/results/v3/tune-physionet-q20/tune.json"}

name = sys.argv[1]
tuned = load_tuned(TUNED[name])
base = dataset(name, seed=0)
feds = [base.validation_split(0.15, seed) for seed in range(3)]


def run_of(method: str, local_epochs: int | None = None, options: dict | None = None, **changes):
    """(Method, lr, local epochs): `method`'s tuned winner with `options` added and Method fields `changes`."""
    won = tuned[f"{name}/{method}"]
    m = method_with(method, {**won["options"], **(options or {})}).with_(**changes)
    return m, won["lr"], local_epochs or won["local_epochs"]


VARIANTS = {
    "fedavg": lambda: run_of("fedavg"),
    "fedprox": lambda: run_of("fedprox"),
    "fedadam": lambda: run_of("fedadam"),
    "fediomt": lambda: run_of("fediomt"),
    "epochs1": lambda: run_of("fediomt", local_epochs=1),
    "dense": lambda: run_of("fediomt", compression=dict(DENSE), forward_compression=dict(DENSE), downlink="full"),
    "nonova": lambda: run_of("fediomt", options={"fednova": False}),
    "nois": lambda: run_of("fediomt", options={"importance_sampling": False}),
    "nobounds": lambda: run_of("fediomt", bounds=BoundsConfig(norm_multiple=0.0, samples_multiple=0.0)),
    "nofilters": lambda: run_of("fediomt", filters=FilterConfig(enabled=[])),
    "fullwork": lambda: run_of("fediomt", partial_work=False),
}
pick = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
for v in pick:
    method, lr, epochs = VARIANTS[v]()
    scores = [score(simulate(fed, method, seed, rounds=RECIPES[name].rounds,
                             lr=lr, local_epochs=epochs, clip=NO_CLIP)) for seed, fed in enumerate(feds)]
    row = {"dataset": name, "variant": v, "scores": scores, "mean": float(np.mean(scores))}
    print(v, np.round(scores, 4), round(row["mean"], 4), flush=True)
    with open(Path(__file__).with_name("results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
