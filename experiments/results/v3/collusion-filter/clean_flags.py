"""Which filter flags which device on watch's clean validation draws, FedIoMT at its re-tuned settings
(watch-merged.json here) with the new default filters and, for comparison, the previous ones (the norm z-score
alone, OR-ed with the cosine filter, emulated by running each filter on all updates), 60 rounds, draws 0-2.
  PYTHONPATH=. .venv/bin/python experiments/results/v3/collusion-filter/clean_flags.py > clean_flags.txt
Other draws, the new default only: `clean_flags.py 4,7` (> clean_flags_draws.txt).
"""
import sys
from collections import Counter
from pathlib import Path

import edge.aggregate as aggregate
from edge.aggregate import FilterConfig
from experiments.accuracy import NO_CLIP
from experiments.sim.harness import dataset, simulate
from experiments.tune import load_tuned, method_with

sys.path.insert(0, str(Path(__file__).parent))
from previous_filters import run_filters as previous  # noqa: E402

won = load_tuned("experiments/results/v3/collusion-filter/watch-merged.json")["watch/fediomt"]
base = dataset("watch", seed=0)
real = aggregate.run_filters

draws = [int(d) for d in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0, 1, 2]
configurations = [("new default", real, ["collusion", "norm", "cosine"]),
                  ("previous default", previous, ["norm", "cosine"])][:1 if len(sys.argv) > 1 else 2]
for label, runner, filters in configurations:
    for draw in draws:
        fed = base.validation_split(0.15, draw)
        flags: Counter = Counter()

        def spy(X, names, params, runner=runner, flags=flags):
            flagged, verdicts = runner(X, names, params)
            flags.update({name: int(v.flags.sum()) for name, v in verdicts.items()})
            return flagged, verdicts

        aggregate.run_filters = spy
        logs = simulate(fed, method_with("fediomt", won["options"]).with_(filters=FilterConfig(enabled=filters)),
                        draw, rounds=60, lr=won["lr"], local_epochs=won["local_epochs"], clip=NO_CLIP)
        aggregate.run_filters = real
        counted = Counter(d for log in logs for d in log.contributors)
        print(f"{label}, draw {draw}: accuracy {logs[-1].accuracy:.3f}; flags per filter {dict(flags)}; rounds "
              f"counted per device {dict(sorted(counted.items()))}", flush=True)
