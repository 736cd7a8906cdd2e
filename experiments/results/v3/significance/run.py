"""Is FedIoMT's test-set gap to the best other method more than noise? (issue 15, "FedIoMT >= every method").

Each method with its tuned settings (the files below), SEEDS seeds on the dataset's fixed test set, as
`fediomt experiment accuracy --tuned` runs it; the final model's test logits are kept (LOGITS.npz) so that the
difference of the seed-averaged headline (AUROC on binary tasks, else accuracy) between FedIoMT and each other method
can be bootstrapped over the test rows (paired: the same resampled rows for both; 2,000 resamples), which the seeds
alone cannot show: every seed scores the same test rows.

Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/significance/run.py DATASET SEEDS [ROUNDS] [METHOD,...]
Writes DATASET.npz (logits per method and seed, the labels) and DATASET.json (the table) here.
"""
import json
import sys
from pathlib import Path

import numpy as np

from cloud.evaluation import auroc
from experiments.accuracy import NO_CLIP
from experiments.sim.harness import RECIPES, dataset, simulator
from experiments.tune import load_tuned, tuned_run

TUNED = {"heart": "experiments/results/v3/tune-fediomt-momentum/heart-merged.json",
         "physionet2012": "experiments/results/v3/tune-fediomt-epochs/physionet2012-merged.json",
         "watch": "experiments/results/v3/tune-fediomt-momentum/watch-merged.json"}
HERE = Path(__file__).parent


def headline(logits: np.ndarray, y: np.ndarray) -> float:
    """AUROC for a binary task (two logits), else accuracy."""
    return auroc(y, logits[:, 1] - logits[:, 0]) if logits.shape[1] == 2 else float(np.mean(logits.argmax(1) == y))


def compare(logits: dict[str, np.ndarray], y: np.ndarray, resamples: int = 2000) -> list[dict]:
    """Per method: the seed-averaged headline and its per-seed values; against FedIoMT also the difference, its
    95 % interval over `resamples` paired bootstraps of the test rows, and how often FedIoMT came out lower."""
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(resamples)]
    per_seed = {m: [headline(lg, y) for lg in v] for m, v in logits.items()}
    boot = {m: np.array([np.mean([headline(lg[i], y[i]) for lg in v]) for i in draws]) for m, v in logits.items()}
    table = []
    for m in logits:
        row = {"method": m, "mean": float(np.mean(per_seed[m])), "per_seed": per_seed[m]}
        if m != "fediomt" and "fediomt" in logits:
            diffs = boot["fediomt"] - boot[m]
            row.update(fediomt_minus=float(np.mean(per_seed["fediomt"]) - row["mean"]),
                       ci95=np.percentile(diffs, [2.5, 97.5]).tolist(), p_fediomt_lower=float(np.mean(diffs < 0)))
        table.append(row)
    return table


def main() -> None:
    name, seeds = sys.argv[1], int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else RECIPES[name].rounds
    methods = sys.argv[4].split(",") if len(sys.argv) > 4 else ["fedavg", "fedprox", "scaffold", "fedadam",
                                                                 "fediomt"]
    tuned, recipe = load_tuned(TUNED[name]), RECIPES[name]
    logits: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    y = None
    for seed in range(seeds):
        fed = dataset(name, seed=seed)
        y = fed.y_test if y is None else y
        assert np.array_equal(y, fed.y_test), "the test set must be the same for every seed"
        for method in methods:
            run = tuned_run(tuned, name, method, recipe.lr, recipe.local_epochs)
            sim = simulator(fed, run.pop("method"), seed, rounds=rounds, clip=NO_CLIP, eval_every=rounds, **run)
            sim.run()
            sim.model.set_flat(sim.cloud.state.server.weights)
            logits[method].append(sim.model.infer(fed.x_test))
            print(name, method, seed, round(headline(logits[method][-1], y), 4), flush=True)
    table = compare({m: np.stack(v) for m, v in logits.items()}, y)
    for row in table:
        print(json.dumps(row), flush=True)
    np.savez_compressed(HERE / f"{name}.npz", y=y, **{m: np.stack(v) for m, v in logits.items()})
    (HERE / f"{name}.json").write_text(json.dumps({"dataset": name, "seeds": seeds, "rounds": rounds,
                                                   "tuned": TUNED[name], "table": table}, indent=1))


if __name__ == "__main__":
    main()
