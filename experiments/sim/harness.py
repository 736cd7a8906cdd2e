"""What every experiment (experiments/<name>.py) shares: datasets at a chosen scale, one simulated run, seeds ->
mean and spread, and the three outputs (DIR/NAME.json, DIR/NAME.md, DIR/NAME*.png)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from experiments.datasets import Client, Federation, load
from experiments.datasets.federation import assign_edges
from experiments.sim import METHODS, RoundLog, SimConfig, Simulator
from experiments.sim.models import initial_weights, trainable

REPO = Path(__file__).resolve().parents[2]
PHYSIONET = Path(os.environ.get("FEDIOMT_PHYSIONET", REPO.parent / "shared" / "datasets" / "physionet2012"))
# datasets given on the command line (`--data csv:PATH` / `physionet2012:DIR`): name -> loader(seed) -> Federation
CUSTOM: dict[str, object] = {}
# raw-feature loaders: "federated" | "none" (the ablation); quantile None = the dataset's Recipe.clip_quantile
STANDARDIZE: dict = {"mode": "federated", "quantile": None}


@dataclass(frozen=True)
class Scale:
    """How a dataset is spread: each natural client split into `split` devices; `edges` > 0 regroups the natural
    sites over that many edges (0 keeps the loader's edges)."""

    split: int = 1
    edges: int = 0


def available_datasets(quick: bool) -> list[str]:
    if quick:
        return ["heart"]
    return ["heart", "watch"] + (["physionet2012"] if PHYSIONET.exists() else [])


def dataset(name: str, scale: Scale = Scale(), seed: int = 0) -> Federation:
    """Dataset `name` spread by `scale`; a raw-feature one (a --data set, PhysioNet 2012) then standardised by the
    daemons' statistics rounds, as a deployment scales it (`prepare`)."""
    if name in CUSTOM:
        fed = CUSTOM[name](seed)
    elif name == "physionet2012":
        from experiments.datasets.physionet2012 import load_physionet_federation

        if not PHYSIONET.exists():
            raise SystemExit(f"physionet2012: no set-a at {PHYSIONET} (the shared datasets live beside the repository "
                             "in development only)")
        fed = load_physionet_federation(PHYSIONET, raw=True)
    else:
        fed = load(name)
    fed = rescale(fed, scale, np.random.default_rng(seed))
    return fed if fed.schema is None else prepare(fed, seed, name)


def prepare(fed: Federation, seed: int, name: str) -> Federation:
    """A raw-feature federation (fed.schema set) standardised as configured: the federated statistics round
    (experiments.sim.statistics; clipped at the quantile --clip-quantile gives, else at dataset `name`'s recipe's)
    or, as the ablation, not at all. Prints the class balance and site sizes."""
    from experiments.sim.statistics import federated_standardize, no_standardize

    print(fed.describe(), file=sys.stderr)
    if fed.transform is not None:
        return fed
    if STANDARDIZE["mode"] == "none":
        return no_standardize(fed)
    quantile = STANDARDIZE["quantile"]
    return federated_standardize(fed, seed, quantile=RECIPES[name].clip_quantile if quantile is None else quantile)


def rescale(fed: Federation, scale: Scale, rng: np.random.Generator) -> Federation:
    """Split every client into `scale.split` devices (random, equal parts) and optionally regroup sites onto edges."""
    edge_of = assign_edges(sorted({c.site or c.id for c in fed.clients}), scale.edges) if scale.edges else None
    clients = []
    for c in fed.clients:
        edge = edge_of[c.site or c.id] if edge_of else c.edge
        parts = np.array_split(rng.permutation(len(c.x)), scale.split) if scale.split > 1 else [np.arange(len(c.x))]
        for j, idx in enumerate(parts):
            cid = c.id if scale.split == 1 else f"{c.id}-{j}"
            clients.append(Client(cid, edge, c.x[idx], c.y[idx], c.site))
    return replace(fed, clients=clients)


def batch_for(fed: Federation, largest: int = 16) -> int:
    """The largest power of two <= `largest` that every device can fill once."""
    smallest = min(len(c.x) for c in fed.clients)
    return 1 << int(math.log2(max(1, min(largest, smallest))))


def simulator(fed: Federation, method, seed: int, **options) -> Simulator:
    """A simulator for `method` (a name in experiments.sim.METHODS or a Method) with SimConfig `options`."""
    m = METHODS[method] if isinstance(method, str) else method
    batch = options.pop("batch_size", None) or batch_for(fed)
    model, manifest = trainable(fed.model, batch, **fed.model_options)
    cfg = SimConfig(method=m, seed=seed, **options)
    return Simulator(fed, model, manifest, initial_weights(fed.model, seed, **fed.model_options), cfg)


def simulate(fed: Federation, method, seed: int, **options) -> list[RoundLog]:
    """One simulated federated run: its per-round logs (one progress line on stderr)."""
    from cloud.evaluation import degenerate

    sim = simulator(fed, method, seed, **options)
    logs = sim.run()
    last = logs[-1]
    warning = degenerate(last.top_class_share, last.auroc)
    seen = {d for log in logs for d in log.contributors}
    absent = [c.id for c in fed.clients if c.id not in seen]
    print(f"{fed.name} {sim.method.name} seed={seed} devices={len(fed.clients)} rounds={len(logs)} "
          f"accuracy={last.accuracy} auroc={last.auroc} wall/round={np.mean([x.wall_s for x in logs]):.3f}s"
          + (f" {warning}" if warning else "") + (f" NEVER CONTRIBUTED: {', '.join(absent)}" if absent else ""),
          file=sys.stderr, flush=True)
    return logs


def participation(logs: list[RoundLog], fed: Federation) -> dict[str, float]:
    """Per device: the share of rounds in which its update counted in an aggregate."""
    return {c.id: sum(c.id in log.contributors for log in logs) / max(len(logs), 1) for c in fed.clients}


def centralized(fed: Federation, seed: int, quick: bool = False):
    """The centralized yardstick (experiments.baseline.centralized: the firmware architecture on the pooled data,
    learning rate and epochs chosen on a validation split, no privacy): a Yardstick."""
    from experiments.baseline import centralized as tuned

    return tuned(fed, seed, lrs=(1e-3,), max_epochs=5, patience=2) if quick else tuned(fed, seed)


def references(fed: Federation, seed: int, quick: bool = False) -> list:
    """The non-federated references on the same features (experiments.baseline.references): Yardsticks."""
    from experiments.baseline import references as tuned

    return tuned(fed, seed, quick)


def mean_spread(values: Iterable[float | None]) -> dict:
    """mean, std (population), min, max and n over the finite values (None when none is finite)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def summarize(rows: list[dict], keys: list[str], value: str) -> list[dict]:
    """Group per-seed rows by `keys` and give the mean and spread of `value` (rows keep the key order seen)."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r[value])
    out = []
    for key, vals in groups.items():
        s = mean_spread(vals)
        out.append({**dict(zip(keys, key)), value: s["mean"], f"{value}_std": s["std"], f"{value}_min": s["min"],
                    f"{value}_max": s["max"], "seeds": s["n"], "missing": len(vals) - s["n"]})
    return out


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def log_rows(logs: list[RoundLog]) -> list[dict]:
    return [asdict(log) for log in logs]


def write_outputs(out: Path, name: str, args, rows: list[dict], summary: list[dict], table: list[dict],
                  columns: list[str], notes: str, extra: dict | None = None) -> dict:
    """DIR/NAME.json (per-seed rows, mean/spread summary, the table, the run's settings) and DIR/NAME.md."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    doc = {"experiment": name, "quick": bool(args.quick), "seeds": int(args.seeds), "settings": settings,
           "rows": rows, "summary": summary, "table": table, **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=_json_default, allow_nan=False))
    quick = " (--quick: small and short, not the paper's figures)" if args.quick else ""
    (out / f"{name}.md").write_text(f"# {name}{quick}\n\n{notes}\n\n{markdown_table(table, columns)}\n")
    return doc


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def plot(path: Path, series: dict[str, tuple[list, list, list | None]], xlabel: str, ylabel: str, title: str,
         hlines: dict[str, float] | None = None, xscale: str = "linear") -> None:
    """Line plot of {label: (x, mean, std or None)} with optional horizontal reference lines (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y, err) in series.items():
        y = np.array([np.nan if v is None else v for v in y], float)
        ax.plot(x, y, marker="o", ms=3, label=label)
        if err is not None:
            e = np.array([0.0 if v is None else v for v in err], float)
            ax.fill_between(x, y - e, y + e, alpha=0.2)
    for label, value in (hlines or {}).items():
        ax.axhline(value, ls="--", lw=1, color="grey")
        ax.annotate(label, (ax.get_xlim()[0], value), fontsize=7, va="bottom")
    ax.set_xscale(xscale)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Recipe:
    """Per-dataset training settings shared by every method (tuned once on FedAvg, then fixed)."""

    lr: float
    rounds: int
    quick_rounds: int
    local_epochs: int = 1
    dp_clip: float = 1.0           # per-example clip of DP-SGD runs (~ median per-example gradient norm)
    central_clip: float = 0.2      # edge user-level clip of central-DP runs (~ median update norm)
    clip_quantile: float = 0.0     # raw-feature data: clip each feature at its federated q / 1 - q quantiles


RECIPES = {
    "heart": Recipe(lr=0.1, rounds=30, quick_rounds=4),
    "watch": Recipe(lr=0.2, rounds=40, quick_rounds=4, dp_clip=3.0, central_clip=0.8),
    # clip_quantile 0.2: the firmware MLP's best of 0-0.3 over 5 validation draws; the test set did not confirm the
    # gain (EXPERIMENTS.md "PhysioNet's features")
    "physionet2012": Recipe(lr=0.05, rounds=30, quick_rounds=4, central_clip=0.1, clip_quantile=0.2),
}


TABULAR = Recipe(lr=0.1, rounds=30, quick_rounds=4)   # a consortium's own tabular export (--data)


def register_data(args) -> list[str]:
    """`--data csv:PATH --label COL [--site COL] [--test-data PATH]` or `--data physionet2012:DIR [--outcomes FILE]
    [--test-data DIR --test-outcomes FILE]`: register the dataset under a name (the file's stem) with the tabular
    (or PhysioNet) recipe; returns [name] ([] without --data)."""
    spec = getattr(args, "data", None)
    if not spec:
        return []
    kind, _, path = spec.partition(":")
    if kind == "csv" and path:
        from experiments.datasets.csv_sites import load_csv_federation

        if not getattr(args, "label", None):
            raise SystemExit("--data csv:PATH needs --label COL (and --site COL, or a Dirichlet split: --sites K "
                             "--alpha A)")
        name = Path(path).stem

        def loader(seed: int) -> Federation:
            return load_csv_federation(path, args.label, args.site, seed=seed, test_path=args.test_data,
                                       sites=args.sites, alpha=args.alpha, categorical=args.categorical)
    elif kind == "physionet2012" and path:
        from experiments.datasets.physionet2012 import load_physionet_federation

        name = "physionet2012-" + Path(path).name

        def loader(seed: int) -> Federation:
            return load_physionet_federation(path, seed=seed, outcomes=args.outcomes, test_root=args.test_data,
                                             test_outcomes=args.test_outcomes, raw=True, stratified=True)
    else:
        raise SystemExit(f"--data {spec!r}: expected csv:PATH or physionet2012:DIR")
    CUSTOM[name] = loader
    RECIPES.setdefault(name, RECIPES["physionet2012"] if kind == "physionet2012" else TABULAR)
    return [name]


def rounds_for(name: str, args) -> int:
    if getattr(args, "rounds", 0):
        return int(args.rounds)
    recipe = RECIPES[name]
    return recipe.quick_rounds if args.quick else recipe.rounds


def datasets_for(args) -> list[str]:
    if getattr(args, "data", None):
        return [n for n in CUSTOM if n == _custom_name(args.data)] or register_data(args)
    return list(args.datasets) if getattr(args, "datasets", None) else available_datasets(args.quick)


def _custom_name(spec: str) -> str:
    kind, _, path = spec.partition(":")
    return "physionet2012-" + Path(path).name if kind == "physionet2012" else Path(path).stem


def scale_for(args) -> Scale:
    return Scale(split=int(getattr(args, "split", 1) or 1), edges=int(getattr(args, "edges", 0) or 0))


def methods_for(args, default: tuple[str, ...]) -> tuple[str, ...]:
    chosen = getattr(args, "methods", None)
    return tuple(m for m in default if m in chosen) if chosen else default


def n_params(fed: Federation) -> int:
    return int(initial_weights(fed.model, 0, **fed.model_options).size)
