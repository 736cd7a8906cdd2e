"""Figure 3: accuracy vs epsilon in {0.5, 1, 2, 5, 10, inf} for local-only, central-only and two-level DP (FedIoMT).

Privacy units and the budget split:
- local: example-level DP-SGD on each device (the plan's clip/noise_mult), epsilon for one example of any device
  over all rounds, composed by the cloud's accountant (cloud.accounting.device_event, smallest local dataset);
- central: user-level DP at the edges (each device's delta clipped to `central_clip`, Gaussian noise on the sum),
  epsilon for one device's whole participation over all rounds (cloud.accounting.central_event, 1 step per round);
- two-level (distributed DP, issue 16): example-level DP-SGD at the SAME epsilon as local (the x axis), and
  user-level DP at USER_EPSILON (3, delta 1e-5) per aggregate: the devices clip their noise-free delta to
  `central_clip` before their last step's noise (device.training user_clip) and the edges credit that noise, adding
  only the top-up (edge.central_dp). The two guarantees are reported separately (epsilon_device: an example against
  everyone; epsilon_central: a device's whole data against the cloud, trusting the edge or secure aggregation),
  never added. Every mode runs dense float32 updates without filters (crediting needs Gaussian rows; the same
  transport for all modes keeps the comparison fair).
- credit_only (`--modes`, not run by default): two-level with no user-level target: the devices clip to
  `central_clip` before their last step's noise as in two-level, the edges credit that noise and add nothing, and the
  user-level epsilon is whatever the credited noise gives (epsilon_central). The accuracy of local DP with a
  user-level guarantee against the cloud on top, where the edge is trusted.
Noise multipliers are the smallest whose accountant epsilon (RDP, delta = 1e-5) is <= the target; the epsilons the
run's ledger actually reports are in the rows (`epsilon_device`, `epsilon_central`). epsilon = inf: no noise and no
clipping (the non-private reference).
"""

from __future__ import annotations

import math
from functools import lru_cache

from cloud.accounting import Entry, device_event, epsilon
from edge.bounds import BoundsConfig
from experiments.accuracy import NO_CLIP
from experiments.sim import METHODS
from experiments.sim.harness import (
    RECIPES,
    batch_for,
    dataset,
    datasets_for,
    finite_or_none,
    n_params,
    plot,
    rounds_for,
    scale_for,
    simulate,
    summarize,
    write_outputs,
)
from experiments.sim.methods import DENSE, NO_FILTERS
from protocol.messages import TrainingPlan

EPSILONS = (0.5, 1.0, 2.0, 5.0, 10.0, math.inf)
QUICK_EPSILONS = (1.0, math.inf)
MODES = ("local", "central", "two_level")
ALL_MODES = (*MODES, "credit_only")
DELTA = 1e-5
USER_EPSILON = 3.0
# no per-row bounds either: a bound that rescales a noised row (edge.bounds, on by default) makes the edge refuse the
# credit (edge.engine._credited) and clip + add the full central noise on top of the devices' (issue 16)
METHOD = METHODS["fediomt"].with_(compression=dict(DENSE), filters=NO_FILTERS,
                                  bounds=BoundsConfig(norm_multiple=0.0, samples_multiple=0.0))


def calibrate(target: float, history, delta: float = DELTA) -> float:
    """Smallest noise multiplier z (to 0.5%) with epsilon(history(z), delta) <= target; history: z -> [Entry]."""
    lo, hi = 1e-2, 1.0
    while epsilon(history(hi), delta) > target:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(f"epsilon {target} is out of reach")
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if epsilon(history(mid), delta) <= target else (mid, hi)
    return hi


@lru_cache(maxsize=256)
def device_noise(target: float, batch: int, epochs: int, min_local: int, rounds: int, max_steps: int = 0) -> float:
    plan = TrainingPlan(lr=0.1, local_epochs=epochs, batch_size=batch, clip=1.0, noise_mult=0.0, max_steps=max_steps)

    def history(z: float) -> list[Entry]:
        e = device_event(plan, min_local)
        return [Entry(z, e.sample_rate, e.steps)] * rounds

    return calibrate(target, history)


@lru_cache(maxsize=256)
def central_noise(target: float, rate: float, rounds: int) -> float:
    return calibrate(target, lambda z: [Entry(z, rate, 1)] * rounds)


def noisy_update_norm(signal: float, lr: float, steps: int, noise_mult: float, clip: float, batch: int,
                      n_params: int) -> float:
    """Expected L2 norm of a DP-SGD delta: the signal plus `steps` independent N(0, (lr z C / B)^2 I) draws."""
    return math.sqrt(signal**2 + steps * (lr * noise_mult * clip / batch) ** 2 * n_params)


def mode_options(mode: str, eps: float, recipe, batch: int, min_local: int, rounds: int, n_params: int,
                 max_steps: int = 0) -> dict:
    """SimConfig options for one (mode, epsilon). Two-level: the edges' clip is the expected norm of a locally
    noised delta (clipping at the noise-free norm would scale the signal down by the local noise's norm)."""
    if math.isinf(eps):
        return {"clip": NO_CLIP}
    opts = {"clip": NO_CLIP}
    if mode in ("local", "two_level", "credit_only"):
        opts.update(clip=recipe.dp_clip,
                    noise_mult=device_noise(eps, batch, recipe.local_epochs, min_local, rounds, max_steps))
    if mode == "central":
        opts.update(central_clip=recipe.central_clip, central_noise=central_noise(eps, 1.0, rounds))
    if mode == "two_level":
        opts.update(central_clip=recipe.central_clip, central_noise=central_noise(USER_EPSILON, 1.0, rounds))
    if mode == "credit_only":
        opts.update(central_clip=recipe.central_clip, central_noise=0.0)
    return opts


def run(args) -> dict:
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)   # the plots are written before write_outputs
    epsilons = QUICK_EPSILONS if args.quick else EPSILONS
    if getattr(args, "epsilons", None):
        epsilons = tuple(sorted(set(args.epsilons) | {math.inf}))
    max_steps = int(getattr(args, "max_steps", 0) or 0)
    modes = tuple(m for m in ALL_MODES if m in (getattr(args, "modes", None) or MODES))
    for name in datasets_for(args):
        recipe, rounds = RECIPES[name], rounds_for(name, args)
        for seed in range(args.seeds):
            fed = dataset(name, scale_for(args), seed)
            batch, min_local, n = batch_for(fed), min(len(c.x) for c in fed.clients), n_params(fed)
            base = dict(rounds=rounds, lr=recipe.lr, local_epochs=recipe.local_epochs, eval_every=rounds,
                        max_steps=max_steps)
            reference = simulate(fed, METHOD, seed, **base, clip=NO_CLIP)[-1]
            nonprivate, nonprivate_auroc = reference.accuracy, reference.auroc
            for mode in modes:
                for eps in epsilons:
                    if math.isinf(eps):
                        acc, auroc, opts, logs = nonprivate, nonprivate_auroc, {}, None
                    else:
                        opts = mode_options(mode, eps, recipe, batch, min_local, rounds, n, max_steps)
                        logs = simulate(fed, METHOD, seed, **base, **opts)
                        acc, auroc = logs[-1].accuracy, logs[-1].auroc
                    rows.append({"mode": mode, "epsilon": None if math.isinf(eps) else eps, "accuracy": acc,
                                 "nonprivate_accuracy": nonprivate, "auroc": auroc,
                                 "nonprivate_auroc": nonprivate_auroc, "dataset": name, "seed": seed,
                                 "devices": len(fed.clients), "edges": len(fed.edges), "batch": batch,
                                 "min_local": min_local, "rounds": rounds, "max_steps": max_steps,
                                 "noise_mult": opts.get("noise_mult", 0.0),
                                 "central_noise": opts.get("central_noise", 0.0),
                                 "central_clip": opts.get("central_clip", 0.0),
                                 # distributed DP: the devices' noise an edge credited in the last round (smallest
                                 # over edges), in units of the central clip; 0 = the edge added all of it
                                 "credited_noise_mult": logs[-1].credited_noise_mult if logs else 0.0,
                                 "epsilon_device": finite_or_none(logs[-1].epsilon_device) if logs else None,
                                 "epsilon_central": finite_or_none(logs[-1].epsilon_central) if logs else None})
    for r in rows:
        r["ratio"] = r["accuracy"] / r["nonprivate_accuracy"] if r["nonprivate_accuracy"] else None
    keyed = [dict(r, eps_key=r["epsilon"] if r["epsilon"] is not None else "inf") for r in rows]
    summary = summarize(keyed, ["dataset", "mode", "eps_key"], "accuracy")
    ratios = summarize(keyed, ["dataset", "mode", "eps_key"], "ratio")
    table = []
    for s, q in zip(summary, ratios):
        z = [r for r in keyed if (r["dataset"], r["mode"], r["eps_key"]) == (s["dataset"], s["mode"], s["eps_key"])]
        table.append({"dataset": s["dataset"], "mode": s["mode"], "epsilon": s["eps_key"], "accuracy": s["accuracy"],
                      "std": s["accuracy_std"], "pct_of_nonprivate": None if q["ratio"] is None else 100 * q["ratio"],
                      "noise_mult": z[0]["noise_mult"], "central_noise": z[0]["central_noise"],
                      # the weakest seed's user-level guarantee (None: no user-level DP in this mode)
                      "epsilon_central": max((r["epsilon_central"] for r in z if r["epsilon_central"] is not None),
                                             default=None)})
    for name in sorted({r["dataset"] for r in rows}):
        series = {}
        for mode in modes:
            pts = [s for s in summary if s["dataset"] == name and s["mode"] == mode and s["eps_key"] != "inf"]
            series[mode] = ([p["eps_key"] for p in pts], [p["accuracy"] for p in pts], [p["accuracy_std"] for p in pts])
        ref = next(s["accuracy"] for s in summary if s["dataset"] == name and s["eps_key"] == "inf")
        plot(args.out / f"privacy_{name}.png", series, "epsilon", "test accuracy", f"accuracy vs epsilon ({name})",
             {"non-private": ref}, xscale="log")
    return write_outputs(args.out, "privacy", args, rows, summary, table,
                         ["dataset", "mode", "epsilon", "accuracy", "std", "pct_of_nonprivate", "noise_mult",
                          "central_noise", "epsilon_central"],
                         f"FedIoMT, delta = {DELTA}. local: example-level DP-SGD; central: user-level at the edges; "
                         f"two-level: example-level at epsilon + user-level {USER_EPSILON:g}, the devices' noise "
                         "credited; credit_only: two-level where the edge adds nothing (user-level epsilon from the "
                         "devices' noise alone). noise_mult / central_noise: calibrated multipliers.")
