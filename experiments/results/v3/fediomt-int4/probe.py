"""FedIoMT's links in int4 instead of int8 (dense updates up, the edge's forward, the model's delta down), on the
validation draws the tuning uses (issue 15, Table 1: bytes to 90 % of centralized).

Each dataset runs FedIoMT with its tuned configuration (tune.json) on validation_split(0.15, s), s = 0, 1, 2, once
per link width; prints the tuning's score (headline mean over the last 5 rounds), and the bytes up + down until the
headline first reaches each of a few thresholds. Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/fediomt-int4/probe.py DATASET TUNE_JSON >> results.jsonl
"""
import json
import sys

import numpy as np

from experiments.accuracy import NO_CLIP
from experiments.sim.harness import RECIPES, dataset, simulate
from experiments.tune import headline_of, load_tuned, score, tuned_run
from protocol.compression import CompressionSettings

name, tune_json = sys.argv[1], sys.argv[2]
run = tuned_run(load_tuned(tune_json), name, "fediomt", 0.0, 1)
int4 = CompressionSettings(method="dense", bits=4).to_dict()
links = {"int8": run["method"],
         "int4": run["method"].with_(compression=dict(int4), forward_compression=dict(int4),
                                     downlink_compression=dict(int4))}
rounds = 60 if name == "watch" else RECIPES[name].rounds
full = dataset(name)
for width, method in links.items():
    for s in range(3):
        logs = simulate(full.validation_split(0.15, s), method, s, rounds=rounds, lr=run["lr"],
                        local_epochs=run["local_epochs"], clip=NO_CLIP)
        key = headline_of(logs)
        curve = [getattr(x, key) for x in logs]
        spent = np.cumsum([x.bytes_up + x.bytes_down for x in logs])
        print(json.dumps({"dataset": name, "links": width, "draw": s, "score": score(logs), "headline": key,
                          "curve": curve, "bytes": spent.tolist()}), flush=True)
