"""`fediomt experiment NAME [--quick] --out DIR [--seeds N]`: reproduce one of the paper's tables or figures.

Each experiment writes DIR/NAME.json (per-seed rows, mean and spread, the settings), DIR/NAME.md (its table) and
PNG plots. `--quick` is the small, short version the tests run; its numbers are NOT the paper's figures.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

EXPERIMENTS = {
    "accuracy": "accuracy vs rounds: centralized, FedAvg, FedProx, SCAFFOLD, FedIoMT (Figure 2)",
    "communication": "bytes up + down to reach 90% of centralized accuracy (Table 1)",
    "privacy": "accuracy vs epsilon for local, central and two-level DP (Figure 3)",
    "heterogeneity": "headline metric vs compute coefficient of variation (Figure 4)",
    "membership": "membership-inference attack accuracy, loss threshold and shadow models (Table 2)",
    "poisoning": "accuracy with 0-30% malicious devices per filter and attack",
    "tune": "every method's best of the same budget of configurations, on a validation split (not the test set)",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "experiments:\n" + "\n".join(f"  {k:<14} {v}" for k, v in EXPERIMENTS.items())
    parser.add_argument("name", choices=list(EXPERIMENTS), help="which experiment")
    parser.add_argument("--quick", action="store_true", help="small and short (the tests' version)")
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.json, NAME.md and plots")
    parser.add_argument("--seeds", type=int, default=3, help="independent seeds (default 3)")
    parser.add_argument("--datasets", nargs="+", choices=["heart", "watch", "physionet2012"],
                        help="default: heart (quick) or every available dataset")
    parser.add_argument("--methods", nargs="+", choices=["fedavg", "fedprox", "scaffold", "fedadam", "fediomt"],
                        help="accuracy, communication, heterogeneity, tune: only these federated methods (default: "
                             "all)")
    parser.add_argument("--tuned", type=Path,
                        help="accuracy, heterogeneity: each method's settings from a `tune` run's tune.json")
    parser.add_argument("--rounds", type=int, default=0, help="override the dataset recipe's rounds")
    parser.add_argument("--split", type=int, default=1, help="split each natural client into this many devices")
    parser.add_argument("--edges", type=int, default=0, help="regroup the sites over this many edges (0: natural)")
    parser.add_argument("--epsilons", type=float, nargs="+",
                        help="privacy: only these target epsilons (plus the non-private reference)")
    parser.add_argument("--filters", nargs="+",
                        help="poisoning: only these edge filter configurations (none, collusion, norm, cosine, krum, "
                             "collusion+norm+cosine, norm+cosine, trimmed_mean, median, collusion+norm+cosine+trust; "
                             "default: the dataset's set)")
    parser.add_argument("--cvs", type=float, nargs="+",
                        help="heterogeneity: only these compute CVs (default 0, 0.25, 0.5, 1)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="heterogeneity: also evaluate every N rounds, for the accuracy curve and its plateau "
                             "(0: the final round only)")
    parser.add_argument("--modes", nargs="+", choices=["local", "central", "two_level", "credit_only"],
                        help="privacy: only these DP modes (default: local, central, two_level)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="privacy: cap each device's DP-SGD steps per round (plan.max_steps; 0 = one epoch)")
    data = parser.add_argument_group("your own data (instead of --datasets)")
    data.add_argument("--data", metavar="KIND:PATH",
                      help="csv:FILE (with --label, --site or --sites/--alpha) or physionet2012:DIR (any set)")
    data.add_argument("--label", help="csv: the label column")
    data.add_argument("--site", help="csv: the site column (one federated client per value)")
    data.add_argument("--sites", type=int, default=5, help="csv without --site: Dirichlet split into K sites (5)")
    data.add_argument("--alpha", type=float, default=0.5, help="csv without --site: Dirichlet alpha (0.5)")
    data.add_argument("--categorical", choices=["onehot", "reject"], default="onehot",
                      help="non-numeric feature columns: one-hot over their levels, or refuse them")
    data.add_argument("--test-data", metavar="PATH", help="a separate held-out file (csv) or set directory")
    data.add_argument("--outcomes", metavar="FILE", help="physionet2012: the outcomes file of --data's set")
    data.add_argument("--test-outcomes", metavar="FILE", help="physionet2012: the outcomes file of --test-data")
    data.add_argument("--standardize", choices=["federated", "none"], default="federated",
                      help="feature scaling: federated statistics round (default) or none (the ablation)")
    data.add_argument("--clip-quantile", type=float,
                      help="also clip each raw feature at its federated q and 1-q quantiles (a 2nd statistics "
                           "round; default: 0.2 for PhysioNet 2012 sets, 0 = none for csv)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from experiments.sim.harness import STANDARDIZE, quiet_tensorflow, register_data
    from protocol.tabular import TableError

    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if getattr(args, "data", None) and getattr(args, "datasets", None):
        raise SystemExit("--data and --datasets exclude each other")
    quiet_tensorflow()
    STANDARDIZE.update(mode=getattr(args, "standardize", "federated"), quantile=getattr(args, "clip_quantile", None))
    from experiments.tune import TunedFileError

    module = importlib.import_module(f"experiments.{args.name}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        if getattr(args, "data", None):
            register_data(args)
        module.run(args)
    except (TableError, FileNotFoundError, TunedFileError) as exc:   # the user's files: one clear line, exit 2
        print(f"fediomt experiment: {exc}", file=sys.stderr)
        return 2
    print((args.out / f"{args.name}.md").read_text())
    print(f"wrote {args.out / (args.name + '.json')} in {time.monotonic() - t0:.0f} s")
    return 0
