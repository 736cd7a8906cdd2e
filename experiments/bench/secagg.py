"""`fediomt bench secagg`: what secure aggregation costs a device and the edge.

Each case simulates a whole cohort in this process with the real protocol code and real CBOR messages
(protocol.secagg.inprocess); one surviving device is timed over its four steps (compute plus encoding its
messages) and its uplink bytes counted; the edge's unmasking is `SecAggServer.finalize` (share reconstruction,
mask regeneration, summing). `plain_update_bytes` is the same update quantized to the same bits, sent without
masking. The Bonawitz et al. comparison point (2^10 users, 2^20 coordinates, 16-bit inputs: 1.73x) is sized
from real encoded messages of the same shape, since simulating 1024 devices x 1M coordinates does not fit here.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from protocol.messages import encode
from protocol.secagg import Graph, SecAggClient, SecAggConfig, SecAggServer, shamir
from protocol.secagg.crypto import AEAD_NONCE_BYTES
from protocol.secagg.inprocess import run_cohort
from protocol.secagg.messages import AdvertiseKeys, MaskedInput, SealedShare, ShareKeys, UnmaskShares
from protocol.secagg.quant import packed_size, ring_bits
from protocol.signing import generate_signing_key
from protocol.table import print_table

BONAWITZ = {"users": 2**10, "params": 2**20, "bits": 16, "reported_expansion": 1.73}


class TimedClient(SecAggClient):
    """Accumulates compute time and encoded uplink bytes over the four steps."""

    def _timed(self, step, *args):
        start = time.perf_counter()
        msg = step(*args)
        self.bytes_sent = getattr(self, "bytes_sent", 0) + len(encode(msg))
        self.seconds = getattr(self, "seconds", 0.0) + time.perf_counter() - start
        return msg

    def advertise(self):
        return self._timed(super().advertise)

    def share_keys(self, roster):
        return self._timed(super().share_keys, roster)

    def masked_input(self, inbox, vector):
        return self._timed(super().masked_input, inbox, vector)

    def unmask(self, request):
        return self._timed(super().unmask, request)


class TimedServer(SecAggServer):
    """The real SecAggServer with its unmasking step timed, for the benchmark's edge cost."""

    def finalize(self):
        start = time.perf_counter()
        result = super().finalize()
        self.unmask_seconds = time.perf_counter() - start
        return result


def run_case(devices: int, params: int, dropout: float, graph: Graph, bits: int = 16) -> dict:
    rng = np.random.default_rng(devices)
    keys = {f"d{i:04d}": generate_signing_key() for i in range(devices)}
    vectors = {d: rng.normal(0, 0.05, params).astype(np.float32) for d in keys}
    config = SecAggConfig(graph=graph, bits=bits)
    drops = list(keys)[:round(dropout * devices)]
    timed = list(keys)[-1]
    parties: dict[str, object] = {}

    class Client(TimedClient):
        def __init__(self, device_id, *args):
            super().__init__(device_id, *args)
            parties[device_id] = self

    class Server(TimedServer):
        def __init__(self, *args):
            super().__init__(*args)
            parties["edge"] = self

    print(f"  {devices} devices, {graph.value}, {dropout:.0%} dropout ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = run_cohort(vectors, keys, config, drop_after_shares=set(drops[::2]),
                        drop_after_masked=set(drops[1::2]), client_type=Client, server_type=Server)
    wall = time.perf_counter() - start
    plain = sum(np.clip(vectors[d], -config.clip, config.clip).astype(np.float64) for d in result.devices)
    device, edge = parties[timed], parties["edge"]
    plain_bytes = packed_size(params, bits)
    return {"devices": devices, "params": params, "dropout": dropout, "graph": graph.value,
            "k": config.degree(devices), "ring_bits": ring_bits(bits, devices),
            "device_s": device.seconds, "edge_unmask_s": edge.unmask_seconds,
            "device_bytes": device.bytes_sent, "plain_update_bytes": plain_bytes,
            "expansion": device.bytes_sent / plain_bytes, "survivors": len(result.devices),
            "max_abs_error": float(np.abs(result.sum - plain).max()), "simulation_s": wall}


def bonawitz_comparison(graph: Graph) -> dict:
    """Uplink bytes of one device at Bonawitz et al.'s scale, from real encoded messages of the exact sizes."""
    n, params, bits = BONAWITZ["users"], BONAWITZ["params"], BONAWITZ["bits"]
    config = SecAggConfig(graph=graph, bits=bits)
    k, r = config.degree(n), ring_bits(bits, n)
    ids = [f"d{i:04d}" for i in range(n)]
    key, sig, nonce = bytes(32), bytes(64), bytes(16)
    sealed = [SealedShare(ids[0], ids[i + 1], bytes(AEAD_NONCE_BYTES), bytes(2 * shamir.SHARE_BYTES + 16))
              for i in range(k)]
    share = bytes(shamir.SHARE_BYTES)
    messages = [
        AdvertiseKeys("edge", 1, ids[0], key, key, key, nonce, sig),
        ShareKeys("edge", 1, ids[0], sealed, nonce, sig),
        MaskedInput("edge", 1, ids[0], bytes(packed_size(params, r)), [], nonce, sig),
        UnmaskShares("edge", 1, ids[0], {i: share for i in ids[1:k + 1]}, {}, nonce, sig),
    ]
    sent = sum(len(encode(m)) for m in messages)
    return {"graph": graph.value, "users": n, "params": params, "bits": bits, "k": k, "ring_bits": r,
            "device_bytes": sent, "plain_update_bytes": packed_size(params, bits),
            "expansion": sent / packed_size(params, bits), "bonawitz_reported": BONAWITZ["reported_expansion"]}


def plot(cases: list[dict], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for graph in ("full", "sparse"):
        for dropout, style in ((0.0, "-"), (0.1, "--")):
            rows = [c for c in cases if c["graph"] == graph and c["dropout"] == dropout]
            label = f"{graph}, {dropout:.0%} dropout"
            ax1.plot([c["devices"] for c in rows], [c["edge_unmask_s"] for c in rows], style, marker="o", label=label)
            ax2.plot([c["devices"] for c in rows], [c["expansion"] for c in rows], style, marker="o", label=label)
    ax1.axhline(2.0, color="grey", lw=0.8)
    ax2.axhline(2.0, color="grey", lw=0.8)
    ax2.axhline(BONAWITZ["reported_expansion"], color="red", lw=0.8, ls=":", label="Bonawitz et al. 1.73x")
    for ax, ylabel in ((ax1, "edge unmasking (s)"), (ax2, "device uplink / plain quantized update")):
        ax.set_xscale("log")
        ax.set_xlabel("devices in the cohort")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"secure aggregation, {cases[0]['params']:,} parameters, 16-bit inputs")
    fig.tight_layout()
    fig.savefig(out / "secagg.png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    cohorts, params = ((10, 20), 2_000) if args.quick else ((10, 50, 100, 500), 100_000)
    cases = [run_case(n, params, dropout, graph) for n in cohorts for graph in (Graph.FULL, Graph.SPARSE)
             for dropout in (0.0, 0.1)]
    print_table(cases, ["devices", "params", "dropout", "graph", "k", "ring_bits", "device_s", "edge_unmask_s",
                        "device_bytes", "plain_update_bytes", "expansion", "max_abs_error"])
    comparison = [bonawitz_comparison(graph) for graph in (Graph.FULL, Graph.SPARSE)]
    print_table(comparison, ["graph", "users", "params", "k", "ring_bits", "device_bytes", "expansion",
                             "bonawitz_reported"])
    figures = {"cases": cases, "bonawitz_comparison": comparison, "quick": bool(args.quick)}
    at_100 = [c for c in cases if c["devices"] == 100]
    if at_100:
        figures["targets"] = {
            "unmask_s_100_devices_10pct_dropout": {c["graph"]: c["edge_unmask_s"] for c in at_100
                                                   if c["dropout"] == 0.1},
            "max_expansion_100_devices": max(c["expansion"] for c in at_100),
            "unmask_target_s": 2.0, "expansion_target": 2.0}
    plot(cases, args.out)
    return figures

