"""FedIoMT's server optimiser beyond plain averaging and Adam (issue 15 names FedYogi and FedAvgM): each option on
the tuning's own validation draws (`fediomt experiment tune`'s: draws 0-2 of seed 0's split, run seed = draw), the
dataset's tuned device lr and local epochs otherwise; score: tune.score (headline, last 5 rounds).

Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/server-optimizers/probe.py DATASET ROUNDS NAME=JSON ...
e.g. yogi03='{"server_optimizer": "yogi", "server_lr": 0.03}'. Appends one JSON line per option to results.jsonl.
An option "lr" or "local_epochs" replaces the winner's device lr or local epochs, "filters" (a list) the edge
filters. Environment: PROBE_TUNED=FILE starts from another tune.json's winner; PROBE_OUT=FILE appends there
instead; PROBE_METHOD=NAME probes another method (default fediomt).
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

from edge.aggregate import FilterConfig
from experiments.accuracy import NO_CLIP
from experiments.sim.harness import dataset, simulate
from experiments.tune import load_tuned, method_with, score

TUNED = {"watch": "experiments/results/v3/tune-watch/tune.json",
         "heart": "experiments/results/v3/tune-fediomt-epochs/heart-merged.json",
         "physionet2012": "experiments/results/v3/tune-fediomt-epochs/physionet2012-merged.json"}

name, rounds = sys.argv[1], int(sys.argv[2])
METHOD = os.environ.get("PROBE_METHOD", "fediomt")
won = load_tuned(os.environ.get("PROBE_TUNED", TUNED[name]))[f"{name}/{METHOD}"]
base = dataset(name, seed=0)
feds = [base.validation_split(0.15, draw) for draw in range(3)]
for spec in sys.argv[3:]:
    label, options = spec.split("=", 1)
    strategy = json.loads(options)
    lr, epochs = strategy.pop("lr", won["lr"]), strategy.pop("local_epochs", won["local_epochs"])
    filters = strategy.pop("filters", None)
    method = method_with(METHOD, {**won["options"], **strategy})
    method = method if filters is None else method.with_(filters=FilterConfig(enabled=filters))
    scores = [score(simulate(fed, method, draw, rounds=rounds, lr=lr, local_epochs=epochs, clip=NO_CLIP))
              for draw, fed in enumerate(feds)]
    row = {"dataset": name, "method": METHOD, "label": label, "options": json.loads(options), "scores": scores,
           "mean": float(np.mean(scores))}
    print(json.dumps(row), flush=True)
    with open(os.environ.get("PROBE_OUT", Path(__file__).with_name("results.jsonl")), "a") as f:
        f.write(json.dumps(row) + "\n")
