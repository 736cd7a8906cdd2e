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


def headline(logits: np.ndarray, y: np.ndarray, binary: bool) -> float:
    return auroc(y, logits[:, 1] - logits[:, 0]) if binary else float(np.mean(logits.argmax(1) == y))


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
            print(name, method, seed, round(headline(logits[method][-1], y, len(fed.classes) == 2), 4), flush=True)
    binary = logits[methods[0]][0].shape[1] == 2
    score = {m: float(np.mean([headline(lg, y, binary) for lg in logits[m]])) for m in methods}
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(2000)]
    table = []
    for m in methods:
        row = {"method": m, "mean": score[m], "per_seed": [headline(lg, y, binary) for lg in logits[m]]}
        if m != "fediomt" and "fediomt" in methods:
            diffs = np.array([np.mean([headline(a[i], y[i], binary) for a in logits["fediomt"]])
                              - np.mean([headline(b[i], y[i], binary) for b in logits[m]]) for i in draws])
            row.update(fediomt_minus=score["fediomt"] - score[m], ci95=np.percentile(diffs, [2.5, 97.5]).tolist(),
                       p_fediomt_lower=float(np.mean(diffs < 0)))
        table.append(row)
        print(json.dumps(row), flush=True)
    np.savez_compressed(HERE / f"{name}.npz", y=y, **{m: np.stack(v) for m, v in logits.items()})
    (HERE / f"{name}.json").write_text(json.dumps({"dataset": name, "seeds": seeds, "rounds": rounds,
                                                   "tuned": TUNED[name], "table": table}, indent=1))


if __name__ == "__main__":
    main()
