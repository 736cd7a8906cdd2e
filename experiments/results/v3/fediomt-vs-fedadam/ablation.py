"""Where FedIoMT loses to FedAdam: validation-split ablation on watch (3 seeds, mean of the last 5 rounds).

Run from the repository root: PYTHONPATH=. .venv/bin/python experiments/results/v3/fediomt-vs-fedadam/ablation.py
watch 60 0.2 [VARIANT,...]; writes VARIANTS.json here.
"""
import json
import sys
from pathlib import Path

import numpy as np

from edge.aggregate import FilterConfig
from experiments.accuracy import NO_CLIP
from experiments.sim.harness import dataset, simulate
from experiments.sim.methods import DENSE, METHODS
from experiments.tune import score

name = sys.argv[1] if len(sys.argv) > 1 else "watch"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 60
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2
fed = dataset(name).validation_split(0.15, 0)
adam = {"server_optimizer": "adam", "server_lr": 0.03 if name == "watch" else 0.01}
base = METHODS["fediomt"].with_(options={**METHODS["fediomt"].options, **adam})
variants = {
    "fediomt": base,
    "no_filters": base.with_(filters=FilterConfig(enabled=[])),
    "downweight": base.with_(filters=FilterConfig(enabled=["norm", "cosine"], action="downweight")),
    "norm_only": base.with_(filters=FilterConfig(enabled=["norm"])),
    "cosine_only": base.with_(filters=FilterConfig(enabled=["cosine"])),
    "cos_nonova": base.with_(filters=FilterConfig(enabled=["cosine"]), options={**base.options, "fednova": False}),
    "nf_nonova": base.with_(filters=FilterConfig(enabled=[]), options={**base.options, "fednova": False}),
    "nf_nois": base.with_(filters=FilterConfig(enabled=[]), options={**base.options, "importance_sampling": False}),
    "nf_dense": base.with_(filters=FilterConfig(enabled=[]), compression=dict(DENSE), forward_compression=dict(DENSE),
                           downlink="full"),
    "nonova": base.with_(options={**base.options, "fednova": False}),
    "loose": base.with_(options={**base.options, "fednova": False},
                        filters=FilterConfig(enabled=["norm", "cosine"], params={"norm": {"max_z": 6.0},
                                                                                  "cosine": {"min_cos": -0.3}})),
    "loose2": base.with_(options={**base.options, "fednova": False},
                         filters=FilterConfig(enabled=["norm", "cosine"], params={"norm": {"max_z": 5.0},
                                                                                   "cosine": {"min_cos": -0.1}})),
    "fedadam": METHODS["fedadam"].with_(options={**METHODS["fedadam"].options, **adam}),
}
pick = sys.argv[4].split(",") if len(sys.argv) > 4 else list(variants)
out = {}
for v in pick:
    scores = []
    for seed in range(3):
        logs = simulate(fed, variants[v], seed, rounds=rounds, lr=lr, local_epochs=2, clip=NO_CLIP)
        scores.append(score(logs))
    out[v] = scores
    print(v, np.round(scores, 4), round(float(np.mean(scores)), 4), flush=True)
with open(Path(__file__).with_name(f"{name}-{'-'.join(pick)}.json"), "w") as f:
    json.dump(out, f)
