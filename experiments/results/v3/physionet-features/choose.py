"""How PhysioNet 2012's raw features are scaled before training, chosen on validation draws (issue 15).

The experiments fed PhysioNet through a pooled z-score (experiments.datasets.physionet2012.standardize: extreme
values and odd units pass unclipped); a deployment scales with the daemons' statistics rounds (z clipped at 5, and
optionally each feature clipped at its federated q / 1 - q quantiles). Each candidate is scored by the tuned
centralized firmware MLP and a logistic regression on validation draws of the training rows (15 % of every site,
drawn BEFORE the statistics, so they never see it; draw d = validation_split seed d); the test set is not touched.
Run from the repository root (appends one JSON line per draw and candidate to choose.jsonl):
  PYTHONPATH=. .venv/bin/python experiments/results/v3/physionet-features/choose.py DRAWS [QUANTILES]
e.g. `0,1,2 none,0,0.01,0.02,0.05,0.1,0.2` (none: the pooled z-score).
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from experiments.baseline import centralized, logistic_regression
from experiments.datasets.physionet2012 import load_physionet_federation, standardize
from experiments.sim.harness import PHYSIONET
from experiments.sim.statistics import federated_standardize

draws = [int(d) for d in sys.argv[1].split(",")]
candidates = [None if q == "none" else float(q) for q in
              (sys.argv[2] if len(sys.argv) > 2 else "none,0,0.01,0.02,0.05,0.1,0.2").split(",")]
full = load_physionet_federation(PHYSIONET, raw=True)
for draw in draws:
    raw = full.validation_split(0.15, draw)
    for q in candidates:
        if q is None:
            _, *scaled, x_val = standardize(np.concatenate([c.x for c in raw.clients]), *[c.x for c in raw.clients],
                                            raw.x_test)
            fed = replace(raw, clients=[replace(c, x=x) for c, x in zip(raw.clients, scaled)], x_test=x_val,
                          schema=None)
        else:
            fed = federated_standardize(raw, 0, quantile=q, verbose=False)
        row = {"draw": draw, "quantile": q, "mlp_val_auroc": centralized(fed, 0).auroc,
               "logreg_val_auroc": logistic_regression(fed, 0).auroc}
        print(json.dumps(row), flush=True)
        with open(Path(__file__).with_name("choose.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
