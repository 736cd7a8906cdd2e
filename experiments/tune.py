"""Honest tuning: every method gets the same budget of configurations, chosen on a validation split, never the test.

For each dataset and method, each of the method's `BUDGET` configurations in `SEARCH` (device learning rate, local
epochs, and the strategy's own options: server optimiser, its step size, FedProx's mu) runs once per seed s in
0..--seeds-1 on `Federation.validation_split(0.15, s)` (each client lends the validation rows from its own training
data; another seed lends other rows and starts from other weights). A run's score is the headline metric (AUROC on
binary tasks, else accuracy) averaged over the last `TAIL` rounds, so one noisy round does not pick a configuration;
a configuration's score is the mean over the seeds, so one lucky validation draw does not either (heart's validation
set is ~45 rows: one seed's AUROC moves by a few points between draws). DIR/tune.json keeps every run and the
winner per (dataset, method); `fediomt experiment accuracy --tuned DIR/tune.json` then runs each method with its
winner on the real test set. Beside each winner tune.json keeps its lead over the runner-up, paired over the
draws, and that lead's standard error: a lead under 2 standard errors is reported as within the draws' noise (more
--seeds would decide). Every draw comes from seed 0's train/test split. The shipped datasets hold out a fixed
test set; a `--data` CSV without `--test-data` holds out a seed-dependent one, so another seed's test rows may sit in
these validation draws: give such data a fixed `--test-data` file before tuning on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from experiments.accuracy import NO_CLIP, SCORE_KEYS
from experiments.sim.harness import (
    RECIPES,
    dataset,
    datasets_for,
    methods_for,
    rounds_for,
    scale_for,
    simulate,
    write_outputs,
)
from experiments.sim.methods import METHODS as SIM_METHODS

BUDGET = 6
TAIL = 5
METHODS = ("fedavg", "fedprox", "scaffold", "fedadam", "fediomt")
ADAM = ({"server_optimizer": "adam", "server_lr": 0.01}, {"server_optimizer": "adam", "server_lr": 0.03},
        {"server_optimizer": "adam", "server_lr": 0.1})
SGD_SERVER = {"server_optimizer": "sgd", "server_lr": 1.0}
MOMENTUM_SERVER = {"server_optimizer": "momentum", "server_lr": 1.0, "server_momentum": 0.9}


def _grid(lrs: tuple[float, ...], epochs: tuple[int, ...], options: tuple[dict, ...] = ({},)) -> list[dict]:
    return [{"lr_factor": f, "local_epochs": e, "options": o} for f in lrs for e in epochs for o in options]


# Device learning rates are factors of the dataset recipe's lr (its scale differs per model); 6 configurations each.
SEARCH: dict[str, list[dict]] = {
    "fedavg": _grid((0.5, 1.0, 2.0), (1, 2)),
    "fedprox": _grid((0.5, 1.0, 2.0), (2,), ({"mu": 0.01}, {"mu": 0.1})),
    "scaffold": _grid((0.5, 1.0, 2.0), (1, 2)),
    "fedadam": _grid((0.5, 1.0), (2,), ADAM),
    # FedIoMT's server optimiser is one of its settings (cloud.toml [strategy]): plain averaging (with 1 local
    # epoch, as FedAvg's and SCAFFOLD's tunings may pick), server momentum (FedAvgM) or Adam 0.1, the step FedAdam's
    # tuning picks on watch and heart (experiments/results/v3/lr-schedule: FedIoMT's Adam 0.03 scored 0.024 lower
    # on watch's validation draws; server-optimizers: Yogi no better than Adam)
    "fediomt": [{"lr_factor": f, "local_epochs": e, "options": o} for f in (0.5, 1.0)
                for e, o in ((1, SGD_SERVER), (2, MOMENTUM_SERVER), (2, ADAM[2]))],
}
assert all(len(configs) == BUDGET for configs in SEARCH.values()), "every method gets the same tuning budget"


def method_with(name: str, options: dict):
    """The simulator's method `name` (experiments.sim.methods) with extra strategy `options`."""
    base = SIM_METHODS[name]
    return base.with_(options={**base.options, **options})


def tuned_run(tuned: dict[str, dict], dataset_name: str, method: str, lr: float, local_epochs: int) -> dict:
    """simulate() keyword arguments for `method` on `dataset_name`: its winner in `tuned` (load_tuned), else the
    dataset recipe's lr and local epochs."""
    won = tuned.get(f"{dataset_name}/{method}")
    if won is None:
        return {"method": method, "lr": lr, "local_epochs": local_epochs}
    return {"method": method_with(method, won["options"]), "lr": won["lr"], "local_epochs": won["local_epochs"]}


def headline_of(logs) -> str:
    return "auroc" if any(getattr(x, "auroc", None) is not None for x in logs) else "accuracy"


def score(logs) -> float:
    key = headline_of(logs)
    values = [getattr(x, key) for x in logs if getattr(x, key) is not None][-TAIL:]
    return float(np.mean(values)) if values else float("nan")


def lead(winner: list[float], runner_up: list[float]) -> tuple[float, float | None]:
    """The winner's lead over the runner-up, paired over the validation draws (both ran on the same draws): its mean
    and standard error (None from one draw). A lead under 2 standard errors is within the draws' noise: which of the
    two won says more about the draws than about the configurations (heart, 3 draws of ~45 rows: EXPERIMENTS.md
    "Heart and PhysioNet tuned over 10 validation draws")."""
    d = np.asarray(winner, np.float64) - np.asarray(runner_up, np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None


def _ranked(scores: dict[int, list[float]]) -> list[int]:
    """Configurations by mean score, best first (a run without a score, NaN, ranks last)."""
    means = {i: float(np.mean(v)) for i, v in scores.items()}
    return sorted(means, key=lambda i: -means[i] if np.isfinite(means[i]) else np.inf)


def run(args) -> dict:
    rows, chosen, noisy = [], {}, []
    for name in datasets_for(args):
        recipe, rounds = RECIPES[name], rounds_for(name, args)
        # one data split (seed 0's, as the accuracy run's seed 0), several validation draws from its training rows
        base = dataset(name, scale_for(args), 0)
        feds = [base.validation_split(0.15, seed) for seed in range(args.seeds)]
        for method in methods_for(args, METHODS):
            scores: dict[int, list[float]] = {}
            first_runs: dict[int, dict] = {}
            for i, cfg in enumerate(SEARCH[method]):
                runs = []
                for seed, fed in enumerate(feds):
                    logs = simulate(fed, method_with(method, cfg["options"]), seed, rounds=rounds,
                                    lr=recipe.lr * cfg["lr_factor"], local_epochs=cfg["local_epochs"], clip=NO_CLIP)
                    last = logs[-1]
                    runs.append({"dataset": name, "method": method, "config": i, "seed": seed, **cfg,
                                 "lr": recipe.lr * cfg["lr_factor"], "metric": headline_of(logs),
                                 "val_score": score(logs), **{k: getattr(last, k, None) for k in SCORE_KEYS}})
                rows.extend(runs)
                scores[i], first_runs[i] = [r["val_score"] for r in runs], runs[0]
            first, second = _ranked(scores)[:2]
            won = first_runs[first]
            margin, se = lead(scores[first], scores[second])
            separated = None if se is None else bool(margin > 2 * se)
            chosen[f"{name}/{method}"] = {**{k: won[k] for k in ("lr", "local_epochs", "options", "metric")},
                                          "val_score": float(np.mean(scores[first])), "val_scores": scores[first],
                                          "lead": margin, "lead_se": se, "separated": separated}
            if separated is False:
                noisy.append(f"{name}/{method}")
    table = [{"dataset": k.split("/")[0], "method": k.split("/")[1], **{
        "lr": v["lr"], "local_epochs": v["local_epochs"], "options": json.dumps(v["options"]),
        "metric": v["metric"], "val_score": round(v["val_score"], 4), "lead": round(v["lead"], 4),
        "lead_se": "-" if v["lead_se"] is None else round(v["lead_se"], 4)}} for k, v in chosen.items()]
    notes = (f"Each method's best of {BUDGET} configurations on validation splits carved from the clients' training "
             f"data (score: the headline metric averaged over the last {TAIL} rounds, then over {args.seeds} seeds, "
             "each its own validation draw). The test set is not used here. lead: the winner's score minus the "
             "runner-up's, paired over the draws, with its standard error (lead_se).")
    if noisy:
        notes += (f" Within the draws' noise (lead <= 2 lead_se): {', '.join(noisy)}: these draws cannot "
                  "tell the winner from the runner-up (as far as they show, either is as good); more draws (--seeds) "
                  "would decide.")
        print(f"tune: the winner leads by no more than 2 standard errors for {', '.join(noisy)}: within the draws' "
              "noise; more --seeds would decide", file=sys.stderr, flush=True)
    return write_outputs(args.out, "tune", args, rows, [], table,
                         ["dataset", "method", "lr", "local_epochs", "options", "metric", "val_score", "lead",
                          "lead_se"], notes, {"chosen": chosen})


class TunedFileError(ValueError):
    """A --tuned file that is not a tune.json."""


def load_tuned(path: Path) -> dict[str, dict]:
    """{"dataset/method": {"lr", "local_epochs", "options"}} from a tune.json; TunedFileError for anything else."""
    try:
        chosen = json.loads(Path(path).read_text())["chosen"]
        if not all(isinstance(v, dict) and {"lr", "local_epochs", "options"} <= set(v) for v in chosen.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):   # JSONDecodeError is a ValueError
        raise TunedFileError(f"{path}: not a tune.json (`fediomt experiment tune` writes one: {{\"chosen\": "
                             "{\"DATASET/METHOD\": {\"lr\", \"local_epochs\", \"options\"}}})") from None
    return chosen
