"""Does vitals_mlp's width limit PhysioNet 2012? The tuned centralized firmware MLP at several hidden widths on the
validation draws of choose.py (statistics-round scaling at q 0.2, the experiments' choice); the test set is not
touched. Run from the repository root (appends one JSON line per draw and width to capacity.jsonl):
  PYTHONPATH=. .venv/bin/python experiments/results/v3/physionet-features/capacity.py DRAWS WIDTHS
e.g. `0,1,2,3,4 4,8,16,32,64`.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

from experiments.baseline import centralized
from experiments.datasets.physionet2012 import load_physionet_federation
from experiments.sim.harness import PHYSIONET
from experiments.sim.statistics import federated_standardize

draws = [int(d) for d in sys.argv[1].split(",")]
widths = [int(w) for w in sys.argv[2].split(",")]
full = load_physionet_federation(PHYSIONET, raw=True)
for draw in draws:
    fed = federated_standardize(full.validation_split(0.15, draw), 0, quantile=0.2, verbose=False)
    for hidden in widths:
        wide = replace(fed, model_options={**fed.model_options, "hidden": hidden})
        result = centralized(wide, 0)
        row = {"draw": draw, "hidden": hidden, "mlp_val_auroc": result.auroc, "val_loss": result.val_loss,
               "chosen": result.chosen}
        print(json.dumps(row), flush=True)
        with open(Path(__file__).with_name("capacity.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
