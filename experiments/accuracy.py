"""Figure 2: test accuracy vs rounds for centralized, FedAvg, FedProx, SCAFFOLD and FedIoMT on each dataset.

No DP here (the privacy experiment adds it); every method uses the dataset's recipe (same lr, local epochs,
batch, rounds) and the natural partition (or --split/--edges). Centralized is experiments.baseline (Keras, pooled
data, Adam, `centralized_epochs`), reported as one value per seed.
"""

from __future__ import annotations

import json

from experiments.sim.harness import (
    RECIPES,
    centralized,
    dataset,
    datasets_for,
    log_rows,
    methods_for,
    plot,
    rounds_for,
    scale_for,
    simulate,
    summarize,
    write_outputs,
)

METHODS = ("fedavg", "fedprox", "scaffold", "fediomt")
NO_CLIP = 1e6   # per-example clip so large that DP-SGD without noise is plain SGD


def same_runs(a: dict, b: dict) -> bool:
    keys = ("quick", "seeds", "datasets", "rounds", "split", "edges", "methods")
    return all(a.get(k) == b.get(k) for k in keys)


def curves(args, methods=METHODS) -> tuple[list[dict], list[dict]]:
    """(rows: method, dataset, seed, round, accuracy, bytes_up, bytes_down, ...; centralized rows per seed).

    Reuses DIR/accuracy.json when it holds the same runs (same seeds, datasets, rounds and scale)."""
    previous = args.out / "accuracy.json"
    if previous.is_file():
        doc = json.loads(previous.read_text())
        if same_runs(doc.get("settings", {}), vars(args)) and all("bytes_up" in r for r in doc["rows"]):
            rows = [r for r in doc["rows"] if r["method"] in methods]
            return rows, [r for r in doc["rows"] if r["method"] == "centralized"]
    rows, central = [], []
    for name in datasets_for(args):
        recipe = RECIPES[name]
        rounds = rounds_for(name, args)
        for seed in range(args.seeds):
            fed = dataset(name, scale_for(args), seed)
            central.append({"method": "centralized", "dataset": name, "seed": seed, "round": rounds,
                            "accuracy": centralized(fed, seed, 5 if args.quick else recipe.centralized_epochs)})
            for method in methods:
                logs = simulate(fed, method, seed, rounds=rounds, lr=recipe.lr, local_epochs=recipe.local_epochs,
                                clip=NO_CLIP)
                for r in log_rows(logs):
                    rows.append({"method": method, "dataset": name, "seed": seed, **r})
    return rows, central


def run(args) -> dict:
    methods = methods_for(args, METHODS)
    rows, central = curves(args, methods)
    per_round = summarize([{k: r[k] for k in ("method", "dataset", "round", "accuracy")} for r in rows + central],
                          ["method", "dataset", "round"], "accuracy")
    base = {s["dataset"]: s["accuracy"] for s in per_round if s["method"] == "centralized"}
    last = {}
    for s in per_round:
        if s["method"] != "centralized":
            last[(s["method"], s["dataset"])] = s
    table = [{"dataset": d, "method": "centralized", "final_accuracy": base[d], "std": next(
        s["accuracy_std"] for s in per_round if s["method"] == "centralized" and s["dataset"] == d),
        "pct_of_centralized": 100.0} for d in base]
    for (method, d), s in last.items():
        table.append({"dataset": d, "method": method, "final_accuracy": s["accuracy"], "std": s["accuracy_std"],
                      "pct_of_centralized": 100.0 * s["accuracy"] / base[d] if base[d] else None})
    table.sort(key=lambda r: (r["dataset"], r["method"]))
    for d in base:
        series = {}
        for method in methods:
            pts = [s for s in per_round if s["method"] == method and s["dataset"] == d]
            series[method] = ([p["round"] for p in pts], [p["accuracy"] for p in pts], [p["accuracy_std"] for p in pts])
        plot(args.out / f"accuracy_{d}.png", series, "round", "test accuracy", f"accuracy vs rounds ({d})",
             {"centralized": base[d]})
    out_rows = [{k: r.get(k) for k in ("method", "dataset", "seed", "round", "accuracy", "bytes_up", "bytes_down")}
                for r in rows + central]
    return write_outputs(args.out, "accuracy", args, out_rows, per_round, table,
                         ["dataset", "method", "final_accuracy", "std", "pct_of_centralized"],
                         "Final-round test accuracy, mean and std over seeds; no DP.")
