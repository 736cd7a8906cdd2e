"""Poisoning: final accuracy with 0-30% malicious devices, per attack (experiments.sim.poison) and per edge filter.

The federation is FedIoMT (compressed updates, FedNova, ...) with its edge filter configuration swapped: no
filter (plain weighted mean), each filter of edge.filters alone (norm z-score, cosine to the median, Multi-Krum),
FedIoMT's default (norm + cosine), and the robust aggregators (trimmed mean, coordinate median). Filters need at
least `min_updates` (4) updates per edge, so each natural client is split into 5 devices (3 with --quick) unless
--split says otherwise. Malicious devices are drawn once per run; fraction 0 is one run shared by every attack.
"""

from __future__ import annotations

from edge.aggregate import FilterConfig
from experiments.accuracy import NO_CLIP
from experiments.sim import METHODS
from experiments.sim.harness import (
    RECIPES,
    Scale,
    dataset,
    datasets_for,
    plot,
    rounds_for,
    simulate,
    summarize,
    write_outputs,
)
from experiments.sim.poison import KINDS, Poison

FILTERS = {
    "none": FilterConfig(enabled=[]),
    "norm": FilterConfig(enabled=["norm"]),
    "cosine": FilterConfig(enabled=["cosine"]),
    "krum": FilterConfig(enabled=["krum"]),
    "norm+cosine": FilterConfig(enabled=["norm", "cosine"]),
    "trimmed_mean": FilterConfig(enabled=[], aggregator="trimmed_mean"),
    "median": FilterConfig(enabled=[], aggregator="median"),
}
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
QUICK = {"filters": ("none", "norm+cosine"), "attacks": ("sign_flip", "scaling"), "fractions": (0.0, 0.3)}


def run(args) -> dict:
    filters = QUICK["filters"] if args.quick else tuple(FILTERS)
    attacks = QUICK["attacks"] if args.quick else KINDS
    fractions = QUICK["fractions"] if args.quick else FRACTIONS
    scale = Scale(split=args.split if args.split > 1 else (3 if args.quick else 5), edges=args.edges)
    rows = []
    for name in datasets_for(args):
        recipe, rounds = RECIPES[name], rounds_for(name, args)
        for seed in range(args.seeds):
            fed = dataset(name, scale, seed)
            for filt in filters:
                method = METHODS["fediomt"].with_(filters=FILTERS[filt])
                base = dict(rounds=rounds, lr=recipe.lr, local_epochs=recipe.local_epochs, clip=NO_CLIP,
                            eval_every=rounds)
                clean = simulate(fed, method, seed, **base)[-1]
                for attack in attacks:
                    for fraction in fractions:
                        log = clean if fraction == 0 else simulate(fed, method, seed, poison=Poison(attack, fraction),
                                                                   **base)[-1]
                        rows.append({"filter": filt, "attack": attack, "fraction": fraction,
                                     "accuracy": log.accuracy, "dataset": name, "seed": seed,
                                     "devices": len(fed.clients), "flagged_last_round": log.filtered})
    summary = summarize(rows, ["dataset", "filter", "attack", "fraction"], "accuracy")
    table = [{"dataset": s["dataset"], "filter": s["filter"], "attack": s["attack"], "fraction": s["fraction"],
              "accuracy": s["accuracy"], "std": s["accuracy_std"]} for s in summary]
    for name in sorted({r["dataset"] for r in rows}):
        for attack in attacks:
            series = {f: ([s["fraction"] for s in summary if (s["dataset"], s["filter"], s["attack"]) ==
                           (name, f, attack)],
                          [s["accuracy"] for s in summary if (s["dataset"], s["filter"], s["attack"]) ==
                           (name, f, attack)], None) for f in filters}
            plot(args.out / f"poisoning_{name}_{attack}.png", series, "fraction of malicious devices",
                 "final test accuracy", f"{attack} ({name})")
    return write_outputs(args.out, "poisoning", args, rows, summary, table,
                         ["dataset", "filter", "attack", "fraction", "accuracy", "std"],
                         "FedIoMT with each edge filter; final test accuracy, mean and std over seeds.")
