"""Issue 16, "where each mode works": the watch privacy runs at 10, 100 and 1,000 devices per edge side by side.

Reads the `fediomt experiment privacy` outputs beside this folder (privacy-watch-{10,100,1000}per-edge and the
10-per-edge credit_only run), prints one Markdown table (accuracy mean +- std over seeds, % of the same seeds'
non-private accuracy, the weakest seed's user-level epsilon, the smallest credited noise multiplier), writes
summary.json and privacy_watch_scale.png (one panel per devices-per-edge). Run from the repository root:
  .venv/bin/python experiments/results/v3/privacy-watch-scale/summarize.py
"""
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {10: ["privacy-watch-10per-edge", "privacy-watch-10per-edge-credit-only"],
        100: ["privacy-watch-100per-edge"], 1000: ["privacy-watch-1000per-edge"]}
MODES = ("local", "central", "two_level", "credit_only")


def rows_of(per_edge: int) -> list[dict]:
    rows = []
    for name in RUNS[per_edge]:
        path = HERE.parent / name / "privacy.json"
        if path.exists():
            rows += [r for r in json.loads(path.read_text())["rows"] if r["epsilon"] is not None]
            rows += [dict(r, mode="nonprivate") for r in json.loads(path.read_text())["rows"]
                     if r["epsilon"] is None and r["mode"] == "local" and name == RUNS[per_edge][0]]
    return rows


def cell(rows: list[dict]) -> dict:
    acc = np.array([r["accuracy"] for r in rows])
    pct = np.array([r["accuracy"] / r["nonprivate_accuracy"] for r in rows])
    users = [r["epsilon_central"] for r in rows if r.get("epsilon_central") is not None]
    credited = [r["credited_noise_mult"] for r in rows if r.get("credited_noise_mult")]
    return {"accuracy": float(acc.mean()), "std": float(acc.std()), "seeds": len(rows),
            "pct_of_nonprivate": float(100 * pct.mean()),
            "epsilon_device": max((r["epsilon_device"] for r in rows if r.get("epsilon_device") is not None),
                                  default=None),
            "epsilon_user": max(users) if users else None, "credited_noise_mult": min(credited) if credited else None,
            "devices": rows[0]["devices"], "edges": rows[0]["edges"], "batch": rows[0]["batch"],
            "min_local": rows[0]["min_local"], "noise_mult": rows[0]["noise_mult"],
            "central_noise": rows[0]["central_noise"]}


def main() -> None:
    summary, lines = {}, ["| devices per edge | mode | example-level eps | accuracy | % of non-private | user-level "
                          "eps | credited z |", "|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(RUNS), figsize=(5 * len(RUNS), 4), sharey=True)
    for ax, per_edge in zip(axes, RUNS):
        rows = rows_of(per_edge)
        if not rows:
            continue
        ref = cell([r for r in rows if r["mode"] == "nonprivate"])
        summary[per_edge] = {"nonprivate": ref}
        lines.append(f"| {per_edge} | non-private | inf | {ref['accuracy']:.3f} +- {ref['std']:.3f} | 100 | - | - |")
        ax.axhline(ref["accuracy"], color="grey", linestyle="--", label="non-private")
        for mode in MODES:
            eps = sorted({r["epsilon"] for r in rows if r["mode"] == mode})
            cells = [cell([r for r in rows if r["mode"] == mode and r["epsilon"] == e]) for e in eps]
            summary[per_edge].update({f"{mode}@{e:g}": c for e, c in zip(eps, cells)})
            for e, c in zip(eps, cells):
                user = "-" if c["epsilon_user"] is None else f"{c['epsilon_user']:.2f}"
                z = "-" if c["credited_noise_mult"] is None else f"{c['credited_noise_mult']:.1f}"
                lines.append(f"| {per_edge} | {mode} | {e:g} | {c['accuracy']:.3f} +- {c['std']:.3f} | "
                             f"{c['pct_of_nonprivate']:.0f} | {user} | {z} |")
            if cells:
                label = "central (user-level eps = x)" if mode == "central" else mode
                ax.errorbar(eps, [c["accuracy"] for c in cells], [c["std"] for c in cells], marker="o", capsize=3,
                            label=label)
        ax.set_xscale("log")
        ax.set_xlabel("example-level epsilon (delta 1e-5)")
        ax.set_title(f"watch, {per_edge} devices per edge ({ref['devices']} devices)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "privacy_watch_scale.png", dpi=120)
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1, default=lambda x: None if x != x else x))
    print("\n".join(lines))
    assert all(math.isfinite(c["accuracy"]) for s in summary.values() for c in s.values())


if __name__ == "__main__":
    main()
