"""Table 1: bytes (up + down, all control traffic) until the global model first reaches 90% of the centralized
model's headline metric: accuracy, or AUROC on a binary task (experiments.accuracy.headline), whose accuracy can sit
at the majority-class rate from round 1.

Bytes are the encoded sizes of every message of the run (experiments.sim): GlobalModel and RoundAnnouncement to
every edge and every addressed device, DeviceUpdate/DeviceStatus up, Ack down, EdgeAggregate up. A seed whose
run never reaches the target within its rounds has bytes_to_target None (counted in `missing`).
"""

from __future__ import annotations

from experiments.accuracy import METHODS, curves, headline
from experiments.sim.harness import methods_for, plot, summarize, write_outputs

TARGET_FRACTION = 0.9


def bytes_to_target(logs: list[dict], target: float, metric: str = "accuracy"
                    ) -> tuple[int | None, int | None, int, int]:
    """(bytes, round) at the first round whose `metric` >= target (None, None when never), and the up/down bytes
    until then (until the end of the run when never)."""
    up = down = 0
    for r in logs:
        up += r["bytes_up"]
        down += r["bytes_down"]
        if r.get(metric) is not None and r[metric] >= target:
            return up + down, r["round"], up, down
    return None, None, up, down


def run(args) -> dict:
    methods = methods_for(args, METHODS)
    logs, central = curves(args, methods)
    rows = []
    metric = {c["dataset"]: headline(logs, c["dataset"]) for c in central}
    for c in central:
        target = TARGET_FRACTION * c[metric[c["dataset"]]]
        for method in methods:
            run_logs = [r for r in logs if r["method"] == method and r["dataset"] == c["dataset"]
                        and r["seed"] == c["seed"]]
            nbytes, rnd, up, down = bytes_to_target(run_logs, target, metric[c["dataset"]])
            rows.append({"method": method, "dataset": c["dataset"], "seed": c["seed"], "bytes_to_target": nbytes,
                         "metric": metric[c["dataset"]], "target": target, "rounds_to_target": rnd,
                         "bytes_up": up, "bytes_down": down,
                         "bytes_per_round": (up + down) / max(rnd or len(run_logs), 1)})
    summary = []
    for value in ("bytes_to_target", "target", "rounds_to_target", "bytes_per_round"):
        summary += [dict(s, figure=value) for s in summarize(rows, ["method", "dataset"], value)]
    table = []
    for s in summary:
        if s["figure"] != "bytes_to_target":
            continue
        fedavg = next((x["bytes_to_target"] for x in summary if x["figure"] == "bytes_to_target"
                       and x["method"] == "fedavg" and x["dataset"] == s["dataset"]), None)   # not run: no ratio
        per_round = next(x["bytes_per_round"] for x in summary if x["figure"] == "bytes_per_round"
                         and x["method"] == s["method"] and x["dataset"] == s["dataset"])
        rounds = next(x["rounds_to_target"] for x in summary if x["figure"] == "rounds_to_target"
                      and x["method"] == s["method"] and x["dataset"] == s["dataset"])
        table.append({"dataset": s["dataset"], "method": s["method"], "bytes_to_target": s["bytes_to_target"],
                      "std": s["bytes_to_target_std"], "seeds_reached": s["seeds"], "rounds": rounds,
                      "bytes_per_round": per_round,
                      "reduction_vs_fedavg": fedavg / s["bytes_to_target"] if fedavg and s["bytes_to_target"]
                      else None})
    for dataset in sorted({r["dataset"] for r in table}):
        series = {}
        for method in methods:
            pts = [r for r in logs if r["method"] == method and r["dataset"] == dataset and r["seed"] == 0]
            cum, xs = 0, []
            for r in pts:
                cum += r["bytes_up"] + r["bytes_down"]
                xs.append(cum)
            series[method] = (xs, [r[metric[dataset]] for r in pts], None)
        target = next(c[metric[dataset]] for c in central if c["dataset"] == dataset and c["seed"] == 0) \
            * TARGET_FRACTION
        plot(args.out / f"communication_{dataset}.png", series, "cumulative bytes (up + down)",
             f"test {metric[dataset]}", f"{metric[dataset]} vs bytes ({dataset}, seed 0)",
             {"90% of centralized": target}, xscale="log")
    return write_outputs(args.out, "communication", args, rows, summary, table,
                         ["dataset", "method", "bytes_to_target", "std", "seeds_reached", "rounds", "bytes_per_round",
                          "reduction_vs_fedavg"],
                         "Bytes up + down (every message) until the test headline metric (accuracy; AUROC on binary "
                         "tasks) first reaches 90% of the centralized baseline's; mean over the seeds that reached it.")
