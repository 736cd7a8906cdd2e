"""FedIoMT's server optimiser beyond plain averaging and Adam (issue 15 names FedYogi and FedAvgM): each option on
the tuning's own validation draws (`fediomt experiment tune`'s: draws 0-2 of seed 0's split, run seed = draw), the
dataset's tuned device lr and local epochs otherwise; score: tune.score (headline, last 5 rounds).

Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/server-optimizers/probe.py DATASET ROUNDS NAME=JSON ...
e.g. yogi03='{"server_optimizer": "yogi", "server_lr": 0.03}'. Appends one JSON line per option to results.jsonl.
"""
import json
import sys
from pathlib import Path

import numpy as np

from experiments.accuracy import NO_CLIP
from experiments.sim.harness import dataset, simulate
from experiments.tune import load_tuned, method_with, score

TUNED = {"watch": "experiments/results/v3/tune-watch/tune.json",
         "heart": "experiments/results/v3/tune-fediomt-epochs/heart-merged.json",
         "physionet2012": "experiments/results/v3/tune-fediomt-epochs/physionet2012-merged.json"}

name, rounds = sys.argv[1], int(sys.argv[2])
won = load_tuned(TUNED[name])[f"{name}/fediomt"]
base = dataset(name, seed=0)
feds = [base.validation_split(0.15, draw) for draw in range(3)]
for spec in sys.argv[3:]:
    label, options = spec.split("=", 1)
    method = method_with("fediomt", {**won["options"], **json.loads(options)})
    scores = [score(simulate(fed, method, draw, rounds=rounds, lr=won["lr"], local_epochs=won["local_epochs"],
                             clip=NO_CLIP)) for draw, fed in enumerate(feds)]
    row = {"dataset": name, "label": label, "options": json.loads(options), "scores": scores,
           "mean": float(np.mean(scores))}
    print(json.dumps(row), flush=True)
    with open(Path(__file__).with_name("results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
