"""Issue 16 probe: is the device-side user-level clip what costs two-level DP its accuracy at 100 devices per edge
(watch --split 100 --edges 10, example-level epsilon 10, one DP-SGD step per round)? There the devices' credited
noise covers user-level epsilon 3, so the edges add nothing and two-level differs from local DP only by the clip of
each noise-free one-step delta to the central clip S (0.8, the watch recipe's) before the last step's noise. With
b = 2 and 2-5 records, that delta's norm is up to lr * C * 5 / 2 = 1.5, so S = 1.5 never clips. Credit-only runs
(the edge adds no noise) at S = 0.8 and 1.5, seeds 0-2, same settings as `fediomt experiment privacy --datasets
watch --split 100 --edges 10 --rounds 60 --max-steps 1 --epsilons 10`. Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/privacy-watch-scale/clip_probe.py
Appends one JSON line per run to clip_probe.jsonl beside this file.
"""
import json
from pathlib import Path

from experiments.privacy import METHOD, device_noise
from experiments.sim.harness import RECIPES, Scale, batch_for, dataset, simulate

OUT = Path(__file__).resolve().parent / "clip_probe.jsonl"
ROUNDS, EPSILON = 60, 10.0


def main() -> None:
    recipe = RECIPES["watch"]
    for seed in range(3):
        fed = dataset("watch", Scale(split=100, edges=10), seed)
        batch, smallest = batch_for(fed), min(len(c.x) for c in fed.clients)
        z = device_noise(EPSILON, batch, recipe.local_epochs, smallest, ROUNDS, 1)
        for s in (0.8, 1.5):
            logs = simulate(fed, METHOD, seed, rounds=ROUNDS, lr=recipe.lr, local_epochs=recipe.local_epochs,
                            eval_every=ROUNDS, max_steps=1, clip=recipe.dp_clip, noise_mult=z, central_clip=s,
                            central_noise=0.0)
            row = {"seed": seed, "central_clip": s, "noise_mult": z, "accuracy": logs[-1].accuracy,
                   "epsilon_device": logs[-1].epsilon_device, "epsilon_central": logs[-1].epsilon_central,
                   "credited_noise_mult": logs[-1].credited_noise_mult}
            print(json.dumps(row), flush=True)
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
