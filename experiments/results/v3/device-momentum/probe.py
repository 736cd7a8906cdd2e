"""Does on-device momentum help FedIoMT on watch? (issue 15: "on-device momentum ... if it helps"; validation split.)

Heavy-ball momentum over each round's local steps: after every DP-SGD step the device replaces the step s_t the
graph took by v_t = beta v_{t-1} + s_t (v restarts at 0 each round). The step is a function of the noised update
only, so it is post-processing and spends no privacy; it needs no graph change. beta = 0 is FedIoMT as it runs.
Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/device-momentum/probe.py BETA LR SEEDS >> results.jsonl
The FedIoMT recipe the tuning picked for watch otherwise (2 local epochs, Adam 0.03 at the server, 60 rounds).
"""
import json
import sys

import numpy as np

import device.training
import experiments.sim.simulator
from experiments.accuracy import NO_CLIP
from experiments.sim.harness import dataset, simulate
from experiments.sim.methods import METHODS

beta, lr, seeds = float(sys.argv[1]), float(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
step, train_round = device.training.poisson_step, device.training.train_round
velocity: dict[str, np.ndarray] = {}


def momentum_step(model, *args, **kwargs):
    before = model.get_flat()
    loss = step(model, *args, **kwargs)
    velocity["v"] = beta * velocity.get("v", 0.0) + (model.get_flat() - before)
    model.set_flat((before + velocity["v"]).astype(np.float32))
    return loss


def fresh_round(*args, **kwargs):
    velocity.clear()
    return train_round(*args, **kwargs)


device.training.poisson_step = momentum_step
experiments.sim.simulator.train_round = fresh_round
fed = dataset("watch").validation_split(0.15, 0)
for seed in seeds:
    acc = [x.accuracy for x in simulate(fed, METHODS["fediomt"], seed, rounds=60, lr=lr, local_epochs=2, clip=NO_CLIP)]
    print(json.dumps({"beta": beta, "lr": lr, "seed": seed, "last5": float(np.mean(acc[-5:])), "acc": acc}),
          flush=True)
