"""The demo's federation under device DP (demo-tuning/calibrate.py `cal`: each device's noise calibrated to its own
size, the demo's filters) scored on an exponential moving average of the cloud's models instead of its latest one.

  PYTHONPATH=. .venv/bin/python experiments/results/v3/model-average/demo_ema.py DECAY 0,1,...,9
Appends one JSON line to demo_ema.jsonl here (DECAY 0: the latest model, as the demo runs today).
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "demo-tuning"))
import sim as S  # noqa: E402
from calibrate import noise_for  # noqa: E402
from probe import ema_evaluation  # noqa: E402

from experiments.datasets import load  # noqa: E402
from experiments.sim.simulator import Simulator  # noqa: E402

decay, seeds = float(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
if decay:
    Simulator._evaluate = ema_evaluation(decay)
noise = {c.id: noise_for(len(c.x)) for c in load("watch").clients}
train = Simulator._train


def calibrated(self, dev, ann, steps, settings):
    return train(self, dev, replace(ann, plan=replace(ann.plan, noise_mult=noise[dev.id])), steps, settings)


Simulator._train = calibrated
runs = []
for seed in seeds:
    runs.append(S.run(S.Candidate(), seed, filters=["collusion", "norm", "cosine"],
                      filter_params={"norm": {"min_ratio": 0.0}}))
    print(decay, seed, runs[-1]["final"], runs[-1]["last5"], runs[-1]["wall_s"], flush=True)
row = {"decay": decay, "seeds": seeds, "final": [r["final"] for r in runs], "last5": [r["last5"] for r in runs],
       "mean": float(np.mean([r["final"] for r in runs]))}
with open(HERE / "demo_ema.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print("SUMMARY", json.dumps(row), flush=True)
