"""The 1,000-device run (scale1000-plateau/, `fediomt experiment heterogeneity --datasets watch --split 100 --edges
10 --rounds 150 --methods fediomt --cvs 0 1 --eval-every 10`) with other edge filters, to tell which part of the
new default costs accuracy at 100 devices per edge: FILTERS is `previous` (previous_filters.py: the norm z-score
alone OR-ed with the cosine filter) or a comma-separated list run in order, with `norm:R` for the norm filter at
min_ratio R.
  PYTHONPATH=. .venv/bin/python experiments/results/v3/collusion-filter/scale_previous.py FILTERS SEEDS CVS OUT
e.g. `previous 1 0 DIR` (seed 0, CV 0).
"""
import argparse
import sys
from pathlib import Path

import edge.aggregate as aggregate
from edge.aggregate import FilterConfig
from experiments import cli
from experiments.sim import METHODS

sys.path.insert(0, str(Path(__file__).parent))
from previous_filters import run_filters  # noqa: E402

spec, seeds, cvs, out = sys.argv[1:5]
if spec == "previous":
    aggregate.run_filters = run_filters
    filters = FilterConfig(enabled=["norm", "cosine"])
else:
    names = [name.split(":")[0] for name in spec.split(",")]
    ratios = [float(name.split(":")[1]) for name in spec.split(",") if ":" in name]
    filters = FilterConfig(enabled=names, params={"norm": {"min_ratio": ratios[0]}} if ratios else {})
METHODS["fediomt"] = METHODS["fediomt"].with_(filters=filters)
parser = argparse.ArgumentParser()
cli.configure(parser)
cli.main(parser.parse_args(["heterogeneity", "--datasets", "watch", "--split", "100", "--edges", "10", "--seeds",
                            seeds, "--rounds", "150", "--methods", "fediomt", "--cvs", *cvs.split(","),
                            "--eval-every", "10", "--out", out]))
