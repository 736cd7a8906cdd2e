"""Tuned winners with one thing changed, on the tuning's own validation draws (issue 15 probes).

Run from the repository root: PYTHONPATH=. .venv/bin/python experiments/results/v3/model-average/probe.py DATASET
TUNED.json VARIANT[,VARIANT...] [ROUNDS] [SEEDS]; appends one JSON line per variant to results.jsonl here.
VARIANT is METHOD (its tuned winner in TUNED.json) or `fediomt_nonova` (FedIoMT's winner with FedNova off), each
optionally `@DECAY`: score an exponential moving average of the cloud's models instead of its latest one. The draws,
seeds and score are experiments.tune's (validation_split(0.15, s) of seed 0's split; mean of the last rounds).
"""
import json
import sys
from pathlib import Path

import numpy as np

from experiments.accuracy import NO_CLIP
from experiments.sim.harness import RECIPES, dataset, simulate
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
    if change == "nonova":
        run["method"] = run["method"].with_(options={**run["method"].options, "fednova": False})
    return run


def main() -> None:
    name, tuned_path, pick = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else RECIPES[name].rounds
    seeds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    tuned = load_tuned(tuned_path)
    feds = [dataset(name, seed=0).validation_split(0.15, s) for s in range(seeds)]
    for v in pick:
        base, _, ema = v.partition("@")
        Simulator._evaluate = ema_evaluation(float(ema)) if ema else ORIGINAL
        run = variant(tuned, name, base)
        scores = [score(simulate(fed, run["method"], s, rounds=rounds, lr=run["lr"],
                                 local_epochs=run["local_epochs"], clip=NO_CLIP)) for s, fed in enumerate(feds)]
        row = {"dataset": name, "variant": v, "rounds": rounds, "tuned": str(tuned_path), "scores": scores,
               "mean": float(np.mean(scores))}
        with open(Path(__file__).with_name("results.jsonl"), "a") as out:
            out.write(json.dumps(row) + "\n")
        print(v, np.round(scores, 4), round(row["mean"], 4), flush=True)


if __name__ == "__main__":
    main()
