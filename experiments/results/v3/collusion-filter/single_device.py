"""One targeted device at watch's edge of 5 (the poisoning experiment's 10 % row), the previous and the new default
filters side by side on more seeds than the 3 of poisoning-watch/: is the larger drop with the new default (2.8
against 2.0 points) more than run-to-run noise? 15 rounds, the device-majority gate on, as `poisoning` runs it.
  PYTHONPATH=. .venv/bin/python experiments/results/v3/collusion-filter/single_device.py FIRST LAST
appends one JSON line per seed and configuration to single_device.jsonl; a third argument `current` runs the
current default only (its rows name the norm filter's small-round floor, `min_ratio`).
"""
import inspect
import json
import sys
from pathlib import Path

import edge.aggregate as aggregate
import experiments.poisoning as p
from edge.filters.norm import norm_zscore
from experiments.accuracy import NO_CLIP
from experiments.sim import METHODS
from experiments.sim.harness import RECIPES, Scale, dataset, simulate

sys.path.insert(0, str(Path(__file__).parent))
from previous_filters import run_filters as previous  # noqa: E402

recipe = RECIPES["watch"]
base = dict(rounds=15, lr=recipe.lr, local_epochs=recipe.local_epochs, clip=NO_CLIP, eval_every=15)
for seed in range(int(sys.argv[1]), int(sys.argv[2]) + 1):
    fed = dataset("watch", Scale(split=1), seed)
    direction, _ = p.target_direction(fed, seed)
    configurations = (("previous: norm z-score OR cosine", previous), (p.DEFAULT_FILTER, aggregate.run_filters))
    for name, runner in configurations[1:] if sys.argv[3:] == ["current"] else configurations:
        method = METHODS["fediomt"].with_(filters=p.FILTERS[p.DEFAULT_FILTER if runner is not previous
                                                            else "norm+cosine"])
        row = {"seed": seed, "filters": name}
        if sys.argv[3:] == ["current"]:
            row["min_ratio"] = inspect.signature(norm_zscore).parameters["min_ratio"].default
        real, aggregate.run_filters = aggregate.run_filters, runner
        for attack in ("none", "targeted", "targeted_spread"):
            bad = None if attack == "none" else p.poison(attack, 0.1, direction)
            row[attack] = simulate(fed, method, seed, poison=bad, **base)[-1].accuracy
        aggregate.run_filters = real
        with open(Path(__file__).with_name("single_device.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
