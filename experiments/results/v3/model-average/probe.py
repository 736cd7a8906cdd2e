"""Tuned winners with one thing changed, on the tuning's own validation draws (issue 15 probes).

Run from the repository root: PYTHONPATH=. .venv/bin/python experiments/results/v3/model-average/probe.py DATASET
TUNED.json VARIANT[,VARIANT...] [ROUNDS] [SEEDS] [CV]; appends one JSON line per variant to results.jsonl here
(with the score at round 40 too, `mean40`, when ROUNDS > 40; CV: compute heterogeneity as in Figure 4).
VARIANT is METHOD (its tuned winner in TUNED.json) or FedIoMT's winner with one change: `fediomt_nonova` (FedNova
off), `fediomt_nofilters` (no edge filters), `fediomt_float32` (dense float32 links, full model down),
`fediomt_normratio:R` (the norm filter's small-round floor at R x the median norm), or METHOD_epochs:N (its winner
with N local epochs); each optionally `@DECAY`:
score an exponential moving average of the cloud's models instead of its latest one. The draws,
seeds and score are experiments.tune's (validation_split(0.15, s) of seed 0's split; mean of the last rounds).
PROBE_SPLIT=test runs each seed's real split (as significance/run.py) and scores the test set instead (`final`:
the last round's headline): a diagnosis of a test-set gap, never a basis for a choice.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

from edge.aggregate import FilterConfig
from experiments.accuracy import NO_CLIP
from experiments.sim.harness import RECIPES, dataset, simulate
from experiments.sim.hetero import HeteroConfig
from experiments.sim.methods import DENSE
from experiments.sim.simulator import Simulator
from experiments.tune import load_tuned, score, tuned_run

ORIGINAL = Simulator._evaluate


def ema_evaluation(decay: float):
    """Simulator._evaluate scoring an exponential moving average of the cloud's models (warm-up as in Keras)."""
    def _evaluate(self, weights):
        t = getattr(self, "_ema_t", 0)
        d = min(decay, (1 + t) / (10 + t))
        self._ema = weights.astype(np.float64) if t == 0 else d * self._ema + (1 - d) * weights
        self._ema_t = t + 1
        return ORIGINAL(self, self._ema.astype(np.float32))
    return _evaluate


def variant(tuned: dict, name: str, v: str) -> dict:
    method, _, change = v.partition("_")
    run = tuned_run(tuned, name, method, RECIPES[name].lr, 2)
    m = run["method"]
    if change == "nonova":
        run["method"] = m.with_(options={**m.options, "fednova": False})
    elif change == "nofilters":
        run["method"] = m.with_(filters=FilterConfig(enabled=[]))
    elif change.startswith("normratio:"):   # the norm filter's small-round floor at R x the median norm
        run["method"] = m.with_(filters=FilterConfig(enabled=list(m.filters.enabled),
                                                     params={"norm": {"min_ratio": float(change.split(":")[1])}}))
    elif change.startswith("epochs:"):   # another number of local epochs (any method)
        run["local_epochs"] = int(change.split(":")[1])
    elif change == "float32":   # dense float32 on every link, the full model down every round
        run["method"] = m.with_(compression=dict(DENSE), forward_compression=dict(DENSE), downlink="full")
    return run


def main() -> None:
    name, tuned_path, pick = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else RECIPES[name].rounds
    seeds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    cv = float(sys.argv[6]) if len(sys.argv) > 6 else None
    hetero = {} if cv is None else {"hetero": HeteroConfig(cv=cv)}
    tuned = load_tuned(tuned_path)
    test = os.environ.get("PROBE_SPLIT") == "test"   # a diagnosis on the test set, never a choice
    feds = [dataset(name, seed=s) if test else dataset(name, seed=0).validation_split(0.15, s) for s in range(seeds)]
    for v in pick:
        base, _, ema = v.partition("@")
        Simulator._evaluate = ema_evaluation(float(ema)) if ema else ORIGINAL
        run = variant(tuned, name, base)
        runs = [simulate(fed, run["method"], s, rounds=rounds, lr=run["lr"], local_epochs=run["local_epochs"],
                         clip=NO_CLIP, **hetero) for s, fed in enumerate(feds)]
        scores = [score(logs) for logs in runs]
        row = {"dataset": name, "variant": v, "rounds": rounds, "tuned": str(tuned_path), "scores": scores,
               "mean": float(np.mean(scores))}
        if test:
            row["split"] = "test"
            row["final"] = [logs[-1].accuracy if logs[-1].auroc is None else logs[-1].auroc for logs in runs]
        if cv is not None:
            row["cv"] = cv
        if rounds > 40:
            row["scores40"] = [score(logs[:40]) for logs in runs]
            row["mean40"] = float(np.mean(row["scores40"]))
        with open(Path(__file__).with_name("results.jsonl"), "a") as out:
            out.write(json.dumps(row) + "\n")
        print(v, np.round(scores, 4), round(row["mean"], 4), round(row.get("mean40", np.nan), 4), flush=True)


if __name__ == "__main__":
    main()
