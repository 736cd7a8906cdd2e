"""The edge filters as they ran before the collusion check: every filter on every update, flags OR-ed, the norm
filter on its z-score alone. Patched in for `edge.aggregate.run_filters` by this directory's probes."""
import numpy as np

from edge.filters import FILTERS, Verdict


def run_filters(X: np.ndarray, names: list[str], params: dict) -> tuple[np.ndarray, dict[str, Verdict]]:
    verdicts = {name: FILTERS[name](X, **({"min_ratio": 0.0} if name == "norm" else {})) for name in names}
    return np.logical_or.reduce([v.flags for v in verdicts.values()]), verdicts
