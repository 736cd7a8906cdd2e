"""Issue 16 probes of the one gap the privacy-at-scale runs left open: two-level below local DP at 100 devices per
edge and example-level epsilon 10 (watch --split 100 --edges 10, 60 one-step rounds), where the edges add no noise.
Same settings as `fediomt experiment privacy`. Run from the repository root:

  PYTHONPATH=. .venv/bin/python experiments/results/v3/privacy-watch-scale/probes.py clip
      Is it the device-side user-level clip? Credit-only (the devices clip to S before their last noise, the edges
      credit it and add nothing) at S = 0.8 (the watch recipe's) and 1.5, seeds 0-2. With b = 2 and 2-5 records a
      one-step delta's norm is at most lr * C * 5 / 2 = 1.5, so S = 1.5 never clips. -> clip_probe.jsonl
  PYTHONPATH=. .venv/bin/python experiments/results/v3/privacy-watch-scale/probes.py seeds
      Is it seed noise? Local DP and credit-only at S = 0.8 on seeds 3-6. -> local_vs_credit.jsonl

  PYTHONPATH=. .venv/bin/python experiments/results/v3/privacy-watch-scale/probes.py user
      What user-level epsilon can two-level buy at 10 devices per edge (watch --split 10 --edges 10) without falling
      below local DP? Two-level at example-level epsilon 1 and 10 with user-level targets 5, 10 and 30 (the runs
      asked for 3), seeds 0-2. -> user_level_10per_edge.jsonl

Each run appends one JSON line to its file beside this one.
"""
import json
import sys
from pathlib import Path

from experiments.privacy import METHOD, central_noise, device_noise
from experiments.sim.harness import RECIPES, Scale, batch_for, dataset, simulate

HERE = Path(__file__).resolve().parent
ROUNDS, EPSILON = 60, 10.0
RECIPE = RECIPES["watch"]


def run(out: Path, seed: int, split: int = 100, epsilon: float = EPSILON, **row) -> None:
    """One run at `split` devices per edge (10 edges), example-level `epsilon`; `row`'s central_clip/central_noise
    (if any) make it two-level (credit-only at noise 0), and every key of `row` is recorded with the outcome."""
    fed = dataset("watch", Scale(split=split, edges=10), seed)
    z = device_noise(epsilon, batch_for(fed), RECIPE.local_epochs, min(len(c.x) for c in fed.clients), ROUNDS, 1)
    options = {k: v for k, v in row.items() if k in ("central_clip", "central_noise")}
    logs = simulate(fed, METHOD, seed, rounds=ROUNDS, lr=RECIPE.lr, local_epochs=RECIPE.local_epochs,
                    eval_every=ROUNDS, max_steps=1, clip=RECIPE.dp_clip, noise_mult=z, **options)
    record = {"seed": seed, "split": split, "epsilon": epsilon, **row, "noise_mult": z, "accuracy": logs[-1].accuracy,
              "epsilon_device": logs[-1].epsilon_device, "epsilon_central": logs[-1].epsilon_central,
              "credited_noise_mult": logs[-1].credited_noise_mult}
    print(json.dumps(record), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


def main(probe: str) -> None:
    if probe == "clip":
        for seed in range(3):
            for s in (0.8, 1.5):
                run(HERE / "clip_probe.jsonl", seed, central_clip=s, central_noise=0.0)
    elif probe == "seeds":
        for seed in (3, 4, 5, 6):
            run(HERE / "local_vs_credit.jsonl", seed, mode="local")
            run(HERE / "local_vs_credit.jsonl", seed, mode="credit_only", central_clip=RECIPE.central_clip,
                central_noise=0.0)
    elif probe == "user":
        for seed in range(3):
            for eps in (1.0, 10.0):
                for user_eps in (5.0, 10.0, 30.0):
                    run(HERE / "user_level_10per_edge.jsonl", seed, split=10, epsilon=eps, mode="two_level",
                        user_epsilon=user_eps, central_clip=RECIPE.central_clip,
                        central_noise=central_noise(user_eps, 1.0, ROUNDS))
    else:
        raise SystemExit("usage: probes.py clip|seeds|user")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
