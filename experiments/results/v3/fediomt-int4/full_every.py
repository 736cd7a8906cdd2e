"""FedIoMT on watch's validation draws with the downlink's periodic full version (model_full_every = 20, the
residual folded in) or none after version 1 (1000): does the refresh earn its bytes now that devices that missed a
version catch up from their edge? (issue 15, Table 1). Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/fediomt-int4/full_every.py CONFIG DRAWS >> links.jsonl
CONFIG: int4-f20 | int4-f1000. links.jsonl also holds runs of two probe builds that are not kept: a 2-bit codec
(ternary codes, scale 1.5 x the block's mean |v|: up2-*, all2-*) and an int8 delta instead of the full version
every 10 / 20 versions (flush8-*); and a third whose cloud sent the full versions (the run's first included)
packed as dense int8 codes of the weights, adopting what devices decode, the rounding left in the residual
(int4-f20-p8, beside int4-f20 re-run in the same code: the last 16 lines).
"""
import json
import sys

import numpy as np

from experiments.accuracy import NO_CLIP
from experiments.sim.harness import dataset, simulate
from experiments.tune import load_tuned, score, tuned_run

config, draws = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
run = tuned_run(load_tuned("experiments/results/v3/tune-watch/tune.json"), "watch", "fediomt", 0.0, 1)
method = run["method"].with_(full_every={"int4-f20": 20, "int4-f1000": 1000}[config])
full = dataset("watch")
for draw in draws:
    logs = simulate(full.validation_split(0.15, draw), method, draw, rounds=60, lr=run["lr"],
                    local_epochs=run["local_epochs"], clip=NO_CLIP)
    print(json.dumps({"cfg": config, "draw": draw, "score": score(logs), "curve": [x.accuracy for x in logs],
                      "bytes": np.cumsum([x.bytes_up + x.bytes_down for x in logs]).tolist()}), flush=True)
