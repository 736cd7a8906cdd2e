"""The issue-18 attacks on watch (15 rounds, 3 seeds, the natural 2 edges of 5 devices; 10 % = one device, 30 % =
three) with FedIoMT's edge filters replaced by FILTERS (a +-joined list, run in that order), as
`fediomt experiment poisoning --datasets watch --rounds 15 --seeds 3 --filters norm+cosine` runs the default:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/collusion-filter/poisoning_probe.py FILTERS OUT [ATTACKS]
ATTACKS, a comma-separated list, runs only those attacks.
"""
import argparse
import sys

import experiments.poisoning as p
from edge.aggregate import FilterConfig
from experiments import cli

p.FILTERS["norm+cosine"] = FilterConfig(enabled=sys.argv[1].split("+"))
if len(sys.argv) > 3:
    p.ATTACKS = {name: p.ATTACKS[name] for name in sys.argv[3].split(",")}
parser = argparse.ArgumentParser()
cli.configure(parser)
cli.main(parser.parse_args(["poisoning", "--datasets", "watch", "--rounds", "15", "--seeds", "3",
                            "--filters", "norm+cosine", "--out", sys.argv[2]]))
