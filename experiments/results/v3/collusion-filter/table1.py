"""Table 1's FedIoMT row with the new filters, from accuracy-watch/ (the accuracy experiment logs every round's
bytes up and down and test accuracy, which is all `fediomt experiment communication` reads), with
experiments.communication's own bytes_to_target and the same target (90 % of each seed's centralized accuracy);
FedAvg's figure is that of accuracy-watch-3draws/ (it runs no filters, so its runs are unchanged).
  .venv/bin/python experiments/results/v3/collusion-filter/table1.py [ACCURACY_DIR]
(ACCURACY_DIR: another accuracy run's folder, e.g. experiments/results/v3/norm-floor/accuracy-watch.)
"""
import json
import sys
from pathlib import Path

import numpy as np

from experiments.communication import TARGET_FRACTION, bytes_to_target

HERE = Path("experiments/results/v3/collusion-filter")
run = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "accuracy-watch"
rows = json.loads((run / "accuracy.json").read_text())["rows"]
central = {r["seed"]: r["accuracy"] for r in rows if r["method"] == "centralized"}
fedavg = next(t for t in json.loads((HERE.parent / "accuracy-watch-3draws" / "communication.json").read_text())["table"]
              if t["method"] == "fedavg")
reached = []
for seed, accuracy in sorted(central.items()):
    logs = sorted((r for r in rows if r["method"] == "fediomt" and r["seed"] == seed), key=lambda r: r["round"])
    nbytes, rnd, up, down = bytes_to_target(logs, TARGET_FRACTION * accuracy)
    reached.append((nbytes, rnd))
    print(f"seed {seed}: 90 % of {accuracy:.4f} reached in round {rnd} after {nbytes} bytes ({up} up, {down} down)")
mean_bytes, mean_rounds = np.mean([b for b, _ in reached]), np.mean([r for _, r in reached])
print(f"FedIoMT {mean_bytes / 1e6:.3f} MB in {mean_rounds:.1f} rounds; FedAvg {fedavg['bytes_to_target'] / 1e6:.3f} "
      f"MB in {fedavg['rounds']:.1f}: {fedavg['bytes_to_target'] / mean_bytes:.1f}x")
