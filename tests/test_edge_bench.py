"""`fediomt bench edge --quick`: runs the real path (and the daemon behind Mosquitto) and reports the documented
keys, with the NumPy floor above the path."""

from __future__ import annotations

import argparse

from experiments.bench.edge import run


def test_bench_edge_quick_reports_its_figures(tmp_path, capsys):
    figures = run(argparse.Namespace(quick=True, out=tmp_path))
    for key in ("params", "density", "updates_per_s", "numpy_floor_updates_per_s", "filters"):
        assert key in figures
    assert figures["params"] == 100_000 and figures["density"] == 0.01
    assert 0 < figures["updates_per_s"] < figures["numpy_floor_updates_per_s"]
    assert {"norm", "cosine", "krum", "trimmed_mean", "median", "mean"} <= set(figures["filters"])
    assert [c["density"] for c in figures["cases"]] == [0.01, 1.0]
    assert figures["mqtt"]["acked"] == figures["mqtt"]["updates"]      # the daemon behind Mosquitto acked all
    assert "updates_per_s" in capsys.readouterr().out
