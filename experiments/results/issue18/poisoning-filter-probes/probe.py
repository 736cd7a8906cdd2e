"""Can FedIoMT's edge filters cost less on honest non-IID devices and still stop the issue-18 attacks? (watch, 30 %
and one device at an edge of 5, 15 rounds, 3 seeds; EXPERIMENTS.md "Where FedIoMT's last points go").

The default filters' row as `fediomt experiment poisoning` runs it, with the norm filter's parameters replaced:
  PYTHONPATH=. .venv/bin/python experiments/results/issue18/poisoning-filter-probes/probe.py RATIO watch 15
RATIO 1 is the shipped filter (default/). norm-min-ratio-2/ and -3/ came from a probe build whose norm filter also
required the norm to exceed RATIO x the round's median norm (not kept: it lost the targeted attack); cosine-only/ is
`fediomt experiment poisoning --datasets watch --rounds 15 --seeds 3 --filters cosine`.
"""
import argparse
import sys

import experiments.poisoning as p
from edge.aggregate import FilterConfig
from experiments import cli

ratio = float(sys.argv[1])
params = {} if ratio == 1 else {"norm": {"min_ratio": ratio}}
p.FILTERS["norm+cosine"] = FilterConfig(enabled=["norm", "cosine"], params=params)
parser = argparse.ArgumentParser()
cli.configure(parser)
args = parser.parse_args(["poisoning", "--datasets", *sys.argv[2].split(","), "--rounds", sys.argv[3], "--seeds", "3",
                          "--filters", "norm+cosine", "--out", f"/tmp/pois-ratio{ratio:g}-{sys.argv[2]}",
                          *sys.argv[4:]])
cli.main(args)
