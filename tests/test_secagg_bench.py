"""`fediomt bench secagg --quick`: every case carries the documented keys and the sums it reports are right."""

from __future__ import annotations

import argparse

from experiments.bench import secagg


def test_quick_bench_reports_every_case(tmp_path):
    figures = secagg.run(argparse.Namespace(quick=True, out=tmp_path))
    keys = {"devices", "params", "dropout", "graph", "device_s", "edge_unmask_s", "device_bytes",
            "plain_update_bytes"}
    assert {(c["devices"], c["dropout"], c["graph"]) for c in figures["cases"]} == {
        (n, p, g) for n in (10, 20) for p in (0.0, 0.1) for g in ("full", "sparse")}
    for case in figures["cases"]:
        assert keys <= set(case)
        assert case["device_s"] > 0 and case["edge_unmask_s"] > 0
        assert case["device_bytes"] > case["plain_update_bytes"] * (case["ring_bits"] / 16)
        assert case["max_abs_error"] < 1e-3          # the unmasked sum is the plaintext sum up to quantization
    full = next(c for c in figures["bonawitz_comparison"] if c["graph"] == "full")
    assert abs(full["expansion"] - 1.73) < 0.1
    assert (tmp_path / "secagg.png").stat().st_size > 0
