"""watch, 30 % attackers, no edge filters, with and without the cloud trust gate (mirrors experiments.poisoning)."""
import json

from experiments.accuracy import NO_CLIP
from experiments.poisoning import ATTACKS, FILTERS, TRUST_ROOT, poison, target_direction
from experiments.sim import METHODS
from experiments.sim.harness import RECIPES, Scale, dataset, simulate

recipe = RECIPES["watch"]
base = dict(rounds=15, lr=recipe.lr, local_epochs=recipe.local_epochs, clip=NO_CLIP, eval_every=15)
for seed in range(3):
    fed = dataset("watch", Scale(split=1, edges=0), seed)
    direction, _ = target_direction(fed, seed)
    method = METHODS["fediomt"].with_(filters=FILTERS["none"])
    for trust in (0, TRUST_ROOT):
        run = dict(base, trust_root=trust)
        clean = simulate(fed, method, seed, **run)[-1].accuracy
        print(json.dumps({"seed": seed, "trust": trust, "attack": "none", "acc": clean}), flush=True)
        for attack in ATTACKS:
            acc = simulate(fed, method, seed, poison=poison(attack, 0.3, direction), **run)[-1].accuracy
            print(json.dumps({"seed": seed, "trust": trust, "attack": attack, "acc": acc}), flush=True)
