"""Figure 2: test accuracy vs rounds for centralized, FedAvg, FedProx, SCAFFOLD and FedIoMT on each dataset.

No DP here (the privacy experiment adds it); every method uses the dataset's recipe (same lr, local epochs,
batch, rounds) and the natural partition (or --split/--edges). Centralized is experiments.baseline.centralized
(the firmware architecture on the pooled data, lr and epochs chosen on a validation split), and the non-federated
references on the same features (logistic regression, gradient boosting, tuned on the same split) are reported
beside it, one value per seed. Binary tasks are judged by AUROC (with AUPRC and min(Se, +P) beside it): the
table's `pct_of_centralized` is of the headline metric, AUROC there, accuracy on multi-class tasks.
"""

from __future__ import annotations

import json
from pathlib import PurePath

from experiments.sim.harness import (
    RECIPES,
    centralized,
    dataset,
    datasets_for,
    log_rows,
    methods_for,
    plot,
    references,
    rounds_for,
    scale_for,
    simulate,
    summarize,
    write_outputs,
)

METHODS = ("fedavg", "fedprox", "scaffold", "fedadam", "fediomt")
NO_CLIP = 1e6   # per-example clip so large that DP-SGD without noise is plain SGD


def same_runs(a: dict, b: dict) -> bool:
    """Whether two runs' settings (a JSON document's and/or an argparse namespace's) ask for the same runs; paths
    compare by their text, as the JSON stores them."""
    keys = ("quick", "seeds", "datasets", "rounds", "split", "edges", "methods", "data", "label", "site", "sites",
            "alpha", "test_data", "outcomes", "test_outcomes", "standardize", "clip_quantile", "tuned")

    def text(v):
        return str(v) if isinstance(v, PurePath) else v

    return all(text(a.get(k)) == text(b.get(k)) for k in keys)


SCORE_KEYS = ("accuracy", "loss", "auroc", "auprc", "min_se_ppv")
REFERENCES = ("logreg", "gbm")


def curves(args, methods=METHODS) -> tuple[list[dict], list[dict]]:
    """(rows: method, dataset, seed, round, accuracy, auroc, ..., bytes_up, bytes_down, ... and the references'
    rows (logreg, gbm: one per seed at the last round); centralized rows per seed).

    Reuses DIR/accuracy.json when it holds the same runs (same seeds, datasets, rounds and scale)."""
    previous = args.out / "accuracy.json"
    if previous.is_file():
        doc = json.loads(previous.read_text())
        if same_runs(doc.get("settings", {}), vars(args)) and all("bytes_up" in r and "auroc" in r
                                                                  for r in doc["rows"]):
            rows = [r for r in doc["rows"] if r["method"] in methods + REFERENCES]
            return rows, [r for r in doc["rows"] if r["method"] == "centralized"]
    from experiments.tune import load_tuned, tuned_run  # tune imports this module's constants

    rows, central = [], []
    tuned = load_tuned(args.tuned) if getattr(args, "tuned", None) else {}
    for name in datasets_for(args):
        recipe = RECIPES[name]
        rounds = rounds_for(name, args)
        for seed in range(args.seeds):
            fed = dataset(name, scale_for(args), seed)
            for ref in [centralized(fed, seed, args.quick), *references(fed, seed, args.quick)]:
                (central if ref.method == "centralized" else rows).append(
                    {"method": ref.method, "dataset": name, "seed": seed, "round": rounds, **ref.row()})
            for method in methods:
                run = tuned_run(tuned, name, method, recipe.lr, recipe.local_epochs)
                logs = simulate(fed, run.pop("method"), seed, rounds=rounds, clip=NO_CLIP, **run)
                ids = [c.id for c in fed.clients]
                for r in log_rows(logs):
                    rows.append({"method": method, "dataset": name, "seed": seed, **r, "devices": ids})
    return rows, central


def headline(rows: list[dict], dataset: str) -> str:
    """The metric a dataset is judged by: AUROC for a binary task (any row has one), else accuracy."""
    return "auroc" if any(r.get("auroc") is not None for r in rows if r["dataset"] == dataset) else "accuracy"


def run(args) -> dict:
    methods = methods_for(args, METHODS)
    rows, central = curves(args, methods)
    everything = rows + central
    per_round = []
    for key in ("accuracy", "auroc", "auprc", "min_se_ppv"):
        per_round += [dict(s, figure=key) for s in summarize(
            [{"method": r["method"], "dataset": r["dataset"], "round": r["round"], "value": r.get(key)}
             for r in everything], ["method", "dataset", "round"], "value")]
    datasets = sorted({r["dataset"] for r in central})
    final = {}   # (method, dataset, figure) -> the last round's summary
    for s in per_round:
        final[(s["method"], s["dataset"], s["figure"])] = s
    table = []
    for d in datasets:
        metric = headline(everything, d)
        base = final[("centralized", d, metric)]["value"]
        for method in ("centralized", *REFERENCES, *methods):
            if (method, d, "accuracy") not in final:
                continue
            row = {"dataset": d, "method": method, "headline": metric}
            for key in ("accuracy", "auroc", "auprc", "min_se_ppv"):
                s = final[(method, d, key)]
                row[f"final_{key}"], row[f"{key}_std"] = s["value"], s["value_std"]
            value = row[f"final_{metric}"]
            row["pct_of_centralized"] = 100.0 * value / base if base and value is not None else None
            table.append(row)
        series = {}
        for method in methods:
            pts = [s for s in per_round if s["method"] == method and s["dataset"] == d and s["figure"] == metric]
            series[method] = ([p["round"] for p in pts], [p["value"] for p in pts], [p["value_std"] for p in pts])
        lines = {m: final[(m, d, metric)]["value"] for m in ("centralized", *REFERENCES)
                 if (m, d, metric) in final and final[(m, d, metric)]["value"] is not None}
        plot(args.out / f"accuracy_{d}.png", series, "round", f"test {metric}", f"{metric} vs rounds ({d})", lines)
    checks, notes = health(rows, methods)
    for row in table:
        row.update(checks.get((row["dataset"], row["method"]), {}))
    keep = ("method", "dataset", "seed", "round", *SCORE_KEYS, "bytes_up", "bytes_down", "chosen", "val_loss",
            "top_class_share", "contributors", "devices")
    out_rows = [{k: r.get(k) for k in keep} for r in everything]
    return write_outputs(args.out, "accuracy", args, out_rows, per_round, table,
                         ["dataset", "method", "headline", "final_accuracy", "accuracy_std", "final_auroc",
                          "auroc_std", "final_auprc", "final_min_se_ppv", "pct_of_centralized", "degenerate",
                          "min_site_participation"],
                         "Final-round test figures, mean and std over seeds; no DP. Binary tasks are judged by "
                         "AUROC (`headline`; AUPRC and the PhysioNet 2012 score min(Se, +P) at the model's own 0.5 "
                         "threshold beside it), multi-class tasks by accuracy; `pct_of_centralized` is of the "
                         "headline. centralized: the firmware architecture on pooled data, lr and epochs chosen on a "
                         "validation split; logreg, gbm: scikit-learn references on the same features, tuned on "
                         "the same split. `degenerate`: seeds whose final model predicts one class for >= 99% of "
                         "the test set or has an AUROC within 0.02 of 0.5 (a silent failure); "
                         "`min_site_participation`: the smallest share of rounds in which a device's update counted "
                         "(mean over seeds)." + notes)


def health(rows: list[dict], methods) -> tuple[dict, str]:
    """Per (dataset, method): degenerate final models (cloud.evaluation.degenerate) and each device's share of
    rounds in which its update counted; and the markdown lines that list them."""
    from cloud.evaluation import degenerate

    out, lines = {}, []
    for d in sorted({r["dataset"] for r in rows}):
        for m in methods:
            mine = [r for r in rows if r["dataset"] == d and r["method"] == m and "contributors" in r]
            if not mine:
                continue
            seeds = sorted({r["seed"] for r in mine})
            last = [max((r for r in mine if r["seed"] == s), key=lambda r: r["round"]) for s in seeds]
            bad = [(r["seed"], degenerate(r.get("top_class_share"), r.get("auroc"))) for r in last]
            bad = [(s, why) for s, why in bad if why]
            share: dict[str, list[float]] = {}
            for s in seeds:
                logs = [r for r in mine if r["seed"] == s]
                devices = sorted({dev for r in logs for dev in (r.get("devices") or []) + list(r["contributors"])})
                for dev in devices:
                    share.setdefault(dev, []).append(sum(dev in r["contributors"] for r in logs) / len(logs))
            mean_share = {dev: sum(v) / len(seeds) for dev, v in share.items()}
            out[(d, m)] = {"degenerate": f"{len(bad)}/{len(seeds)}",
                           "min_site_participation": min(mean_share.values()) if mean_share else 0.0}
            lines.append(f"- {d} {m}: participation per device " + ", ".join(
                f"{dev} {100 * v:.0f}%" for dev, v in sorted(mean_share.items())) + "".join(
                f"; seed {s}: {why}" for s, why in bad))
    return out, ("\n\nParticipation (share of rounds a device's update counted, mean over seeds) and warnings:\n"
                 + "\n".join(lines)) if lines else ""
