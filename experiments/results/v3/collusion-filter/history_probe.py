"""Would a history of each device's directions expose the blurred colluders (`targeted_spread`)? A FoolsGold-style
probe, not a filter: each device's per-round direction sketches (the ones the cloud's device-majority gate scores,
recorded from cloud.engine's device_cosines) are normalised and summed over the run; the per-round blur averages
out of the colluders' sums while their shared direction adds up. Prints the pairwise cosines of the sums.

Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/collusion-filter/history_probe.py SEED ATTACK DATASET SPLIT
ATTACK: none or a name of experiments.poisoning.ATTACKS (30 % attackers); watch runs 15 rounds, others 20, as the
poisoning runs do. Output of the runs quoted in EXPERIMENTS.md: history_probe.txt.
"""
import sys

import numpy as np

import cloud.engine as engine
from experiments.accuracy import NO_CLIP
from experiments.poisoning import DEFAULT_FILTER, FILTERS, poison, target_direction
from experiments.sim.harness import RECIPES, Scale, dataset, simulator
from experiments.sim.methods import METHODS

recorded = []
scored = engine.device_cosines


def recording(rows, ids, reference):
    recorded.append((np.array(rows, np.float64), list(ids)))
    return scored(rows, ids, reference)


def main() -> None:
    seed, attack, name, split = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    engine.device_cosines = recording
    fed = dataset(name, Scale(split=split), seed)
    direction, _ = target_direction(fed, seed)
    sim = simulator(fed, METHODS["fediomt"].with_(filters=FILTERS[DEFAULT_FILTER]), seed,
                    rounds=15 if name == "watch" else 20, lr=RECIPES[name].lr,
                    local_epochs=RECIPES[name].local_epochs, clip=NO_CLIP,
                    poison=None if attack == "none" else poison(attack, 0.3, direction))
    sim.run()
    bad = {d.id for d in sim.devices if d.malicious}
    sums: dict[str, np.ndarray] = {}
    for rows, ids in recorded:
        for row, device in zip(rows, ids):
            if np.linalg.norm(row) > 0:
                sums[device] = sums.get(device, 0) + row / np.linalg.norm(row)
    ids = sorted(sums)
    unit = np.array([sums[d] / np.linalg.norm(sums[d]) for d in ids])
    cos = unit @ unit.T
    np.fill_diagonal(cos, np.nan)
    print(f"{name} split {split} seed {seed} attack {attack}: median |cos| {np.nanmedian(np.abs(cos)):.2f}")
    for d, row in zip(ids, cos):
        print(f"  {d:<16} {'attacker' if d in bad else 'honest  '} closest {np.nanmax(row):.2f}")


if __name__ == "__main__":
    main()
