"""Table 2: membership-inference attack accuracy (balanced members / non-members, 50% = chance) against the final
model of centralized training, FedAvg, FedAvg + DP, FedIoMT and FedIoMT + DP (experiments.attacks).

Members: a random sample of the target's training examples (all devices' data); non-members: half of the
held-out test set, as many as the members. The other half of the test set is the attacker's: `SHADOWS` shadow
models are trained on random halves of it ("in") with the other half "out", by the same simulator as a single
device holding that data, with the target's training options (its DP noise included). DP = epsilon 1 at
delta 1e-5: FedAvg + DP is device-level DP-SGD; FedIoMT + DP is two-level (epsilon/2 per level, see privacy.py).
"""

from __future__ import annotations

import numpy as np

from experiments.accuracy import NO_CLIP
from experiments.attacks import Outputs, balance, loss_threshold_attack, shadow_attack
from experiments.datasets import Client, Federation
from experiments.privacy import mode_options
from experiments.sim.harness import (
    RECIPES,
    batch_for,
    dataset,
    datasets_for,
    n_params,
    rounds_for,
    scale_for,
    simulator,
    summarize,
    write_outputs,
)

EPSILON = 1.0
SHADOWS = 2
TARGETS = {  # name -> (method, DP mode or None)
    "centralized": ("fedavg", None),
    "fedavg": ("fedavg", None),
    "fedavg+dp": ("fedavg", "local"),
    "fediomt": ("fediomt", None),
    "fediomt+dp": ("fediomt", "two_level"),
}


def single_device(fed: Federation, x: np.ndarray, y: np.ndarray, x_test, y_test) -> Federation:
    return Federation(fed.name, [Client("pooled", "edge1", x, y, "pooled")], x_test, y_test, fed.model,
                      fed.model_options, fed.classes)


def outputs(sim, x_in, y_in, x_out, y_out) -> Outputs:
    sim.model.set_flat(sim.cloud.state.server.weights)
    return Outputs(sim.model.infer(x_in), y_in, sim.model.infer(x_out), y_out)


def run(args) -> dict:
    rows = []
    for name in datasets_for(args):
        recipe, rounds = RECIPES[name], rounds_for(name, args)
        for seed in range(args.seeds):
            rng = np.random.default_rng(1000 + seed)
            fed = dataset(name, scale_for(args), seed)
            x_all, y_all = fed.pooled()
            order = rng.permutation(len(fed.y_test))
            target_out, attacker = order[: len(order) // 2], order[len(order) // 2:]
            members, nonmembers = balance(len(y_all), len(target_out), rng)
            x_in, y_in = x_all[members], y_all[members]
            x_out, y_out = fed.x_test[target_out][nonmembers], fed.y_test[target_out][nonmembers]
            batch, min_local = batch_for(fed), min(len(c.x) for c in fed.clients)
            for target, (method, mode) in TARGETS.items():
                train_fed = single_device(fed, x_all, y_all, fed.x_test, fed.y_test) if target == "centralized" \
                    else fed
                opts = {"clip": NO_CLIP} if mode is None else mode_options(mode, EPSILON, recipe, batch, min_local,
                                                                           rounds, n_params(fed))
                base = dict(rounds=rounds, lr=recipe.lr, local_epochs=recipe.local_epochs, eval_every=rounds,
                            batch_size=batch)
                sim = simulator(train_fed, method, seed, **base, **opts)
                accuracy = sim.run()[-1].accuracy
                shadows = []
                for k in range(SHADOWS if not args.quick else 1):
                    split = np.random.default_rng(seed * 100 + k).permutation(attacker)
                    s_in, s_out = split[: len(split) // 2], split[len(split) // 2:]
                    shadow_fed = single_device(fed, fed.x_test[s_in], fed.y_test[s_in], fed.x_test[s_out],
                                               fed.y_test[s_out])
                    shadow = simulator(shadow_fed, "fedavg", seed * 100 + k, **base, **opts)
                    shadow.run()
                    shadows.append(outputs(shadow, fed.x_test[s_in], fed.y_test[s_in], fed.x_test[s_out],
                                           fed.y_test[s_out]))
                victim = outputs(sim, x_in, y_in, x_out, y_out)
                attacks = {**loss_threshold_attack(victim, shadows), "shadow": shadow_attack(victim, shadows, seed)}
                for attack, acc in attacks.items():
                    rows.append({"method": target, "dataset": name, "attack": attack, "attack_accuracy": acc,
                                 "seed": seed, "model_accuracy": accuracy, "members": len(y_in),
                                 "epsilon": EPSILON if mode else None})
    summary = summarize(rows, ["dataset", "method", "attack"], "attack_accuracy")
    model_acc = {(s["dataset"], s["method"]): s["model_accuracy"]
                 for s in summarize(rows, ["dataset", "method"], "model_accuracy")}
    table = [{"dataset": s["dataset"], "method": s["method"], "attack": s["attack"],
              "attack_accuracy": s["attack_accuracy"], "std": s["attack_accuracy_std"],
              "max": s["attack_accuracy_max"], "model_accuracy": model_acc[(s["dataset"], s["method"])]}
             for s in summary]
    return write_outputs(args.out, "membership", args, rows, summary, table,
                         ["dataset", "method", "attack", "attack_accuracy", "std", "max", "model_accuracy"],
                         "Balanced members/non-members (50% = chance). loss_threshold: threshold from shadow models; "
                         "oracle_threshold: best threshold on the target itself (upper bound); shadow: Shokri et al. "
                         f"DP rows: epsilon = {EPSILON}, delta = 1e-5.")
