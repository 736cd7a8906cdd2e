"""Poisoning: final accuracy with malicious devices, per attack (experiments.sim.poison) and per edge filter.

Two studies, both with FedIoMT's default bounds (edge/bounds.py, docs/edge.md "Bounds") and the cloud's default
device-majority gate (cloud.trust; `collusion+norm+cosine-majority` is the default filters without it) on:

- `single`: ONE malicious device, at the dataset's natural scale (heart: 4 edges of 2 devices), with the default
  filters (collusion + norm + cosine; they need `min_updates` = 4 updates, so at a 2-device edge only the bounds
  act). Target: no attack lowers the mean final accuracy by more than 2 points. (watch: its 10 % row is one device
  at an edge of 5.)
- `fraction`: 10/20/30 % malicious devices (0 and 30 % with --quick), with each filter configuration: no filter
  (plain weighted mean), each filter of edge.filters alone (collusion check, norm z-score, cosine to the median,
  Multi-Krum), FedIoMT's default (collusion + norm + cosine), the previous default (the norm z-score alone +
  cosine), the robust aggregators (trimmed mean, coordinate median), and the default filters plus the cloud's root
  trust gate on a 200-row clean root set (`collusion+norm+cosine+trust`, cloud.trust: an edge whose aggregate points
  away from the cloud's own update on the root set is left out; rows drawn from the clients'). `--filters` runs
  only the named configurations (the `single` study: those of the default filters). Filters need at least
  `min_updates` updates per edge, so each natural client is split into 5 devices (3 with --quick) unless --split
  says otherwise. Target: at 30 %, >= 90 % of the clean accuracy with the default filters. watch: see WATCH.

Attacks (ATTACKS): sign flip, scaling x10, a 1e30 blow-up, label flip, Gaussian noise, model replacement (the
sign-flipped delta boosted x100, also claiming 10^6 samples) and a small-norm targeted attack (a fixed direction
towards predicting the training data's rarest class, sent with the norm of the device's honest delta; `targeted_spread`
blurs it per device and round, so that the colluders' copies are not near-parallel). Malicious
devices are drawn once per run; fraction 0 is one run shared by every attack.
"""

from __future__ import annotations

import numpy as np

from edge.aggregate import FilterConfig
from experiments.accuracy import NO_CLIP
from experiments.sim import METHODS
from experiments.sim.harness import (
    RECIPES,
    Scale,
    batch_for,
    dataset,
    datasets_for,
    plot,
    rounds_for,
    simulate,
    summarize,
    write_outputs,
)
from experiments.sim.poison import Poison

FILTERS = {
    "none": FilterConfig(enabled=[]),
    "norm": FilterConfig(enabled=["norm"]),
    "cosine": FilterConfig(enabled=["cosine"]),
    "krum": FilterConfig(enabled=["krum"]),
    "collusion": FilterConfig(enabled=["collusion"]),
    "collusion+norm+cosine": FilterConfig(enabled=["collusion", "norm", "cosine"]),
    # the norm z-score alone, then cosine (the previous default ran the two OR-ed, each on every update)
    "norm+cosine": FilterConfig(enabled=["norm", "cosine"], params={"norm": {"min_ratio": 0.0}}),
    "trimmed_mean": FilterConfig(enabled=[], aggregator="trimmed_mean"),
    "median": FilterConfig(enabled=[], aggregator="median"),
}
DEFAULT_FILTER = "collusion+norm+cosine"   # edge.aggregate.FilterConfig's defaults
TRUSTED = DEFAULT_FILTER + "+trust"   # the default filters plus the cloud's root trust gate (cloud.trust)
EDGE_ONLY = DEFAULT_FILTER + "-majority"   # the default filters without the cloud's device-majority gate
TRUST_ROOT = 200                 # rows of the cloud's clean root set for the trust gate
ATTACKS = {
    "sign_flip": {"kind": "sign_flip"},
    "scaling": {"kind": "scaling", "scale": 10.0},
    "blowup_1e30": {"kind": "scaling", "scale": 1e30},
    "label_flip": {"kind": "label_flip"},
    "noise": {"kind": "noise"},
    "replacement": {"kind": "replacement", "boost": 100.0},
    "replacement_1e6": {"kind": "replacement", "boost": 100.0, "num_samples": 10**6},
    "targeted": {"kind": "targeted"},
    "targeted_spread": {"kind": "targeted", "spread": 1.0},
}
FRACTIONS = (0.0, 0.3)
# watch (a CNN, ~10x heart's cost per run): its natural 2 edges of 5 devices, the default filters only, and 10 %
# (ONE device at a 5-device edge) beside 30 %; the single-device study at 2-device edges is heart's
WATCH = {"filters": (DEFAULT_FILTER, TRUSTED), "fractions": (0.0, 0.1, 0.3), "split": 1, "single": False}
QUICK = {"filters": ("none", DEFAULT_FILTER, TRUSTED), "attacks": ("sign_flip", "replacement_1e6", "targeted"),
         "fractions": (0.0, 0.3), "single_attacks": ("replacement_1e6", "targeted")}


def target_direction(fed, seed: int, steps: int = 20, lr: float = 0.1) -> tuple[np.ndarray, int]:
    """A fixed unit direction that pushes the model towards predicting one class for every input (the training
    data's rarest class), and that class: plain SGD steps from the run's initial weights on relabelled rows."""
    from device.runtime import TrainableModel
    from experiments.sim.models import initial_weights, trainable

    batch = batch_for(fed)
    model_bytes, manifest = trainable(fed.model, batch, **fed.model_options)
    model = TrainableModel(model_bytes, manifest, rng=np.random.default_rng(seed), num_threads=1)
    w0 = np.asarray(initial_weights(fed.model, seed, **fed.model_options), np.float32)
    x = np.concatenate([c.x for c in fed.clients]).astype(np.float32)
    y = np.concatenate([c.y for c in fed.clients]).astype(np.int64)
    counts = np.bincount(y, minlength=model.n_classes)
    target = int(np.argmin(np.where(counts > 0, counts, counts.max() + 1)))
    model.set_flat(w0)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.choice(len(x), batch)
        model.train_step(x[rows], np.full(batch, target), np.zeros(model.n_params, np.float32), lr=lr, clip=1e6,
                         noise_mult=0.0)
    d = (model.get_flat() - w0).astype(np.float64)
    return (d / np.linalg.norm(d)).astype(np.float32), target


def poison(attack: str, fraction: float, direction: np.ndarray) -> Poison:
    spec = ATTACKS[attack]
    return Poison(fraction=fraction, direction=direction if spec["kind"] == "targeted" else None, **spec)


def run(args) -> dict:
    attacks = QUICK["attacks"] if args.quick else tuple(ATTACKS)
    rows = []
    for name in datasets_for(args):
        recipe, rounds = RECIPES[name], rounds_for(name, args)
        own = WATCH if name == "watch" and not args.quick else {}
        filters = args.filters or (QUICK["filters"] if args.quick else own.get("filters", (*FILTERS, TRUSTED)))
        known = [*FILTERS, TRUSTED, EDGE_ONLY]
        if set(filters) - set(known):
            raise SystemExit(f"--filters: unknown {sorted(set(filters) - set(known))}; known: {', '.join(known)}")
        fractions = QUICK["fractions"] if args.quick else own.get("fractions", FRACTIONS)
        split = Scale(split=args.split if args.split > 1 else (3 if args.quick else own.get("split", 5)),
                      edges=args.edges)
        base = dict(rounds=rounds, lr=recipe.lr, local_epochs=recipe.local_epochs, clip=NO_CLIP, eval_every=rounds)
        for seed in range(args.seeds):
            # --- one malicious device at the natural scale (heart: edges of 2 devices), the default filters
            singles = [f for f in filters if f in (DEFAULT_FILTER, EDGE_ONLY)] if args.filters else [DEFAULT_FILTER]
            for scale, filt in [(Scale(split=1, edges=args.edges), f) for f in singles] if own.get("single", True) \
                    else []:
                fed = dataset(name, scale, seed)
                direction, target = target_direction(fed, seed)
                sizes = sorted({sum(c.edge == e for c in fed.clients) for e in fed.edges})
                one = 1 / len(fed.clients)
                method = METHODS["fediomt"].with_(filters=FILTERS[DEFAULT_FILTER])
                single = dict(base, device_majority=filt != EDGE_ONLY)
                clean = simulate(fed, method, seed, **single)[-1]
                for attack in ("none", *(QUICK["single_attacks"] if args.quick else ATTACKS)):
                    log = clean if attack == "none" else simulate(fed, method, seed,
                                                                  poison=poison(attack, one, direction), **single)[-1]
                    rows.append({"study": "single", "filter": filt, "attack": attack,
                                 "fraction": 0.0 if attack == "none" else round(one, 4),
                                 "accuracy": log.accuracy, "dataset": name, "seed": seed,
                                 "devices": len(fed.clients), "edge_size": "/".join(map(str, sizes)),
                                 "target_class": target, "flagged_last_round": log.filtered})
            # --- a fraction of malicious devices, each filter
            fed = dataset(name, split, seed)
            direction, target = target_direction(fed, seed)
            sizes = sorted({sum(c.edge == e for c in fed.clients) for e in fed.edges})
            for filt in filters:
                edge_filter = filt.removesuffix("+trust").removesuffix("-majority")
                method = METHODS["fediomt"].with_(filters=FILTERS[edge_filter])
                run = dict(base, trust_root=TRUST_ROOT if filt == TRUSTED else 0, device_majority=filt != EDGE_ONLY)
                clean = simulate(fed, method, seed, **run)[-1]
                for attack in attacks:
                    for fraction in fractions:
                        bad = poison(attack, fraction, direction) if fraction else None
                        log = clean if bad is None else simulate(fed, method, seed, poison=bad, **run)[-1]
                        rows.append({"study": "fraction", "filter": filt, "attack": attack, "fraction": fraction,
                                     "accuracy": log.accuracy, "dataset": name, "seed": seed,
                                     "devices": len(fed.clients), "edge_size": "/".join(map(str, sizes)),
                                     "target_class": target, "flagged_last_round": log.filtered})
    keys = ["dataset", "study", "edge_size", "filter", "attack", "fraction"]
    summary = summarize(rows, keys, "accuracy")
    clean = {(s["dataset"], s["study"], s["edge_size"], s["filter"]): s["accuracy"] for s in summary
             if s["fraction"] == 0.0}
    table = []
    for s in summary:
        ref = clean.get((s["dataset"], s["study"], s["edge_size"], s["filter"]))
        table.append({**{k: s[k] for k in keys}, "accuracy": s["accuracy"], "std": s["accuracy_std"],
                      "vs_clean_points": None if ref is None or s["accuracy"] is None
                      else round(100 * (s["accuracy"] - ref), 2),
                      "pct_of_clean": None if not ref or s["accuracy"] is None
                      else round(100 * s["accuracy"] / ref, 1)})
    for name in sorted({r["dataset"] for r in rows}):
        for attack in attacks:
            series = {}
            for f in sorted({r["filter"] for r in rows if r["dataset"] == name and r["study"] == "fraction"}):
                points = sorted((x for x in summary if (x["dataset"], x["study"], x["filter"], x["attack"]) ==
                                 (name, "fraction", f, attack)), key=lambda x: x["fraction"])
                series[f] = ([x["fraction"] for x in points], [x["accuracy"] for x in points], None)
            plot(args.out / f"poisoning_{name}_{attack}.png", series, "fraction of malicious devices",
                 "final test accuracy", f"{attack} ({name})")
    return write_outputs(args.out, "poisoning", args, rows, summary, table,
                         [*keys, "accuracy", "std", "vs_clean_points", "pct_of_clean"],
                         "FedIoMT (default bounds on) with each edge filter; final test accuracy, mean and std over "
                         "seeds; `single`: one malicious device; vs_clean_points and pct_of_clean compare with the "
                         "same filter without attackers.")


def worst(doc: dict) -> dict:
    """The headline checks of a poisoning.json: the largest single-device drop (points) and the lowest share of the
    clean accuracy at 30 % with the default filters, per dataset."""
    out = {}
    for row in doc["table"]:
        d = out.setdefault(row["dataset"], {"single_max_drop_points": None, "default_30pct_min_pct": None})
        if row["study"] == "single" and row["attack"] != "none" and row["vs_clean_points"] is not None:
            drop = -row["vs_clean_points"]
            d["single_max_drop_points"] = max(drop, d["single_max_drop_points"] or -np.inf)
        if row["study"] == "fraction" and row["filter"] == DEFAULT_FILTER and row["fraction"] == 0.3 \
                and row["pct_of_clean"] is not None:
            d["default_30pct_min_pct"] = min(row["pct_of_clean"], d["default_30pct_min_pct"] or np.inf)
    return out

