"""Issue 16 probe: more seeds for the one gap the privacy-at-scale runs left unexplained, two-level below local DP at
100 devices per edge and example-level epsilon 10 (watch --split 100 --edges 10, 60 one-step rounds), where the
edges add no noise. Runs local DP and credit-only (the devices clip to S = 0.8 before their last noise, the edges
credit it and add nothing) on seeds 3-6, the same settings as `fediomt experiment privacy`. Run from the repository
root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/privacy-watch-scale/local_vs_credit.py
Appends one JSON line per run to local_vs_credit.jsonl beside this file.
"""
import json
from pathlib import Path

from experiments.privacy import METHOD, device_noise
from experiments.sim.harness import RECIPES, Scale, batch_for, dataset, simulate

OUT = Path(__file__).resolve().parent / "local_vs_credit.jsonl"
ROUNDS, EPSILON, SEEDS = 60, 10.0, (3, 4, 5, 6)


def main() -> None:
    recipe = RECIPES["watch"]
    for seed in SEEDS:
        fed = dataset("watch", Scale(split=100, edges=10), seed)
        z = device_noise(EPSILON, batch_for(fed), recipe.local_epochs, min(len(c.x) for c in fed.clients), ROUNDS, 1)
        base = dict(rounds=ROUNDS, lr=recipe.lr, local_epochs=recipe.local_epochs, eval_every=ROUNDS, max_steps=1,
                    clip=recipe.dp_clip, noise_mult=z)
        for mode, extra in (("local", {}), ("credit_only", {"central_clip": recipe.central_clip,
                                                            "central_noise": 0.0})):
            logs = simulate(fed, METHOD, seed, **base, **extra)
            row = {"seed": seed, "mode": mode, "noise_mult": z, "accuracy": logs[-1].accuracy,
                   "epsilon_device": logs[-1].epsilon_device, "epsilon_central": logs[-1].epsilon_central,
                   "credited_noise_mult": logs[-1].credited_noise_mult}
            print(json.dumps(row), flush=True)
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
