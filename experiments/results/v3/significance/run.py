"""Is FedIoMT's test-set gap to the best other method more than noise? (issue 15, "FedIoMT >= every method").

Each method with its tuned settings (the files below), SEEDS seeds on the dataset's fixed test set, as
`fediomt experiment accuracy --tuned` runs it; the final model's test logits are kept (LOGITS.npz) so that the
difference of the seed-averaged headline (AUROC on binary tasks, else accuracy) between FedIoMT and each other method
can be bootstrapped over the test rows (paired: the same resampled rows for both; 2,000 resamples), which the seeds
alone cannot show: every seed scores the same test rows.

Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/significance/run.py DATASET SEEDS [ROUNDS] [METHOD,...]
      [--tuned FILE] [--reuse NPZ] [--name NAME]
Writes NAME.npz (logits per method and seed, the labels) and NAME.json (the table) here (NAME: DATASET); --reuse
takes the methods not run from an earlier NPZ of the same test set and seeds (their settings unchanged).
"""
import argparse
import json
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
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("seeds", type=int)
    parser.add_argument("rounds", type=int, nargs="?")
    parser.add_argument("methods", nargs="?", default="fedavg,fedprox,scaffold,fedadam,fediomt")
    parser.add_argument("--tuned")
    parser.add_argument("--reuse", type=Path)
    parser.add_argument("--name")
    args = parser.parse_args()
    name, seeds, methods = args.dataset, args.seeds, args.methods.split(",")
    rounds = args.rounds or RECIPES[name].rounds
    tuned_file = args.tuned or TUNED[name]
    tuned, recipe = load_tuned(tuned_file), RECIPES[name]
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
    stacked = {m: np.stack(v) for m, v in logits.items()}
    if args.reuse:
        earlier = np.load(args.reuse)
        assert np.array_equal(earlier["y"], y), "--reuse: another test set"
        stacked = {**{m: earlier[m] for m in earlier.files if m != "y" and m not in stacked}, **stacked}
        assert all(len(v) == seeds for v in stacked.values()), "--reuse: another number of seeds"
    table = compare(stacked, y)
    for row in table:
        print(json.dumps(row), flush=True)
    out = args.name or name
    np.savez_compressed(HERE / f"{out}.npz", y=y, **stacked)
    (HERE / f"{out}.json").write_text(json.dumps({"dataset": name, "seeds": seeds, "rounds": rounds,
                                                  "tuned": tuned_file, "reused": str(args.reuse or ""),
                                                  "table": table}, indent=1))


if __name__ == "__main__":
    main()
