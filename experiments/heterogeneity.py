"""Figure 4: final accuracy vs the coefficient of variation (CV) of device compute speed, CV in {0, 0.25, 0.5, 1}.

The virtual deadline of every round is 1.5x what the mean-speed, median-bandwidth device needs for one local epoch
and a dense model down + update up, the same for every method (experiments.sim.hetero). FedAvg and SCAFFOLD are
classic fixed-work methods: a device runs its full local epoch and, if that takes past the deadline, its update
arrives late and the edge refuses it (DEADLINE). FedProx and FedIoMT let a slow device run only the steps that fit
(device.training.steps_within, what the device agent does); FedIoMT also normalises by local steps (FedNova).
With --tuned each method runs its own tuned settings (as `accuracy --tuned`), else the dataset recipe's. Each run
is judged by its dataset's headline metric: AUROC on binary tasks (heart, PhysioNet), accuracy on multi-class ones.
"""

from __future__ import annotations

import numpy as np

from experiments.accuracy import NO_CLIP
from experiments.sim.harness import (
    RECIPES,
    dataset,
    datasets_for,
    methods_for,
    plot,
    rounds_for,
    scale_for,
    simulate,
    summarize,
    write_outputs,
)
from experiments.sim.hetero import HeteroConfig
from experiments.tune import headline_of, load_tuned, tuned_run

CVS = (0.0, 0.25, 0.5, 1.0)
METHODS = ("fedavg", "fedprox", "scaffold", "fedadam", "fediomt")


PLATEAU_EVALS = 3   # the plateau: the mean of the last 3 evaluations (with --eval-every 10: the last 30 rounds)


def plateau(scores: list[float]) -> float | None:
    """The mean of the last PLATEAU_EVALS evaluations: where the run levels off, less noisy than its last round."""
    return float(np.mean(scores[-PLATEAU_EVALS:])) if scores else None


def run(args) -> dict:
    rows, methods = [], methods_for(args, METHODS)
    tuned = load_tuned(args.tuned) if getattr(args, "tuned", None) else {}
    cvs = tuple(getattr(args, "cvs", None) or CVS)
    for name in datasets_for(args):
        recipe, rounds = RECIPES[name], rounds_for(name, args)
        every = int(getattr(args, "eval_every", 0) or 0) or rounds
        for seed in range(args.seeds):
            fed = dataset(name, scale_for(args), seed)
            for cv in cvs:
                for method in methods:
                    settings = tuned_run(tuned, name, method, recipe.lr, recipe.local_epochs)
                    logs = simulate(fed, settings["method"], seed, rounds=rounds, lr=settings["lr"],
                                    local_epochs=settings["local_epochs"], clip=NO_CLIP, hetero=HeteroConfig(cv=cv),
                                    eval_every=every)
                    metric = headline_of(logs)
                    offered = [x.participants + x.missed_deadline + x.declined for x in logs]
                    curve = [(x.round, getattr(x, metric)) for x in logs if getattr(x, metric) is not None]
                    rows.append({"method": method, "cv": cv, "headline": metric, "score": getattr(logs[-1], metric),
                                 "accuracy": logs[-1].accuracy, "auroc": logs[-1].auroc, "dataset": name,
                                 "lr": settings["lr"], "local_epochs": settings["local_epochs"],
                                 "plateau": plateau([a for _, a in curve]), "curve": curve,
                                 "seed": seed, "devices": len(fed.clients), "edges": len(fed.edges),
                                 "participation": float(np.mean([x.participants / max(o, 1)
                                                                 for x, o in zip(logs, offered)])),
                                 "mean_local_steps": float(np.mean([x.mean_local_steps for x in logs])),
                                 "virtual_round_s": float(np.mean([x.virtual_s for x in logs])),
                                 "wall_round_s": float(np.mean([x.wall_s for x in logs]))})
    summary = summarize(rows, ["dataset", "method", "cv"], "score")
    extra = {v: summarize(rows, ["dataset", "method", "cv"], v) for v in ("plateau", "participation", "wall_round_s")}
    metric = {r["dataset"]: r["headline"] for r in rows}
    table = []
    for s, t, p, w in zip(summary, extra["plateau"], extra["participation"], extra["wall_round_s"]):
        table.append({"dataset": s["dataset"], "method": s["method"], "cv": s["cv"], "headline": metric[s["dataset"]],
                      "score": s["score"], "std": s["score_std"], "plateau": t["plateau"],
                      "plateau_std": t["plateau_std"], "participation": p["participation"],
                      "wall_s_per_round": w["wall_round_s"]})
    for name in sorted({r["dataset"] for r in rows}):
        series = {m: ([s["cv"] for s in summary if s["dataset"] == name and s["method"] == m],
                      [s["score"] for s in summary if s["dataset"] == name and s["method"] == m],
                      [s["score_std"] for s in summary if s["dataset"] == name and s["method"] == m])
                  for m in methods}
        plot(args.out / f"heterogeneity_{name}.png", series, "CV of device compute speed",
             f"final test {metric[name]}", f"{metric[name]} vs compute heterogeneity ({name})")
        if every < rounds:   # the curves, seed 0: where each method levels off
            curves = {f"{r['method']} cv={r['cv']:g}": ([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], None)
                      for r in rows if r["dataset"] == name and r["seed"] == 0}
            plot(args.out / f"heterogeneity_{name}_curves.png", curves, "round", f"test {metric[name]}",
                 f"{metric[name]} vs rounds, seed 0 ({name})")
    return write_outputs(args.out, "heterogeneity", args, rows, summary, table,
                         ["dataset", "method", "cv", "headline", "score", "std", "plateau", "plateau_std",
                          "participation", "wall_s_per_round"],
                         "score: the final test headline metric (AUROC on binary tasks, else accuracy); "
                         "plateau = its mean over the last 3 evaluations (--eval-every); "
                         "participation = updates counted / devices that trained; "
                         "wall_s_per_round = real seconds per simulated round in this process.")
