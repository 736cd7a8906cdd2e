"""`fediomt bench codec`: bytes of one update vs dense float32, and encode/decode speed next to numpy's own
tobytes/frombuffer in the same run.

Deltas are real training deltas: an MLP on scikit-learn's bundled digits set (no download) is trained as the
"global" model, then one client fine-tunes it on a tenth of the data; delta = client - global. Two sizes: a
256x256 MLP (85,002 parameters) and a 954x972 MLP (exactly 1,000,000). `--quick` uses heavy-tailed synthetic
deltas (Student-t, 3 degrees of freedom) instead, which is said in the output (`delta_source`).
It also trains a small model by FedAvg with compressed updates, with and without error feedback, to show the
accuracy effect (`error_feedback_training`); the paper-scale version belongs to the communication experiment.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np

from protocol.compression import CompressionSettings, decode_sparse, decode_update, encode_update

DENSITIES = (0.1, 0.01, 0.001)
BITS = (32, 8, 4)
HIDDEN = {85_002: (256, 256), 1_000_000: (954, 972)}  # digits: 64 inputs, 10 classes


def mlp_delta(hidden: tuple[int, int], seed: int = 0) -> np.ndarray:
    """client - global weights of a digits MLP: global trained 5 epochs on all, client 3 more on a tenth."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    model = MLPClassifier(hidden_layer_sizes=hidden, max_iter=5, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    client = copy.deepcopy(model)
    shard = np.random.default_rng(seed).permutation(len(x))[: len(x) // 10]
    for _ in range(3):
        client.partial_fit(x[shard], y[shard])

    def flat(m) -> np.ndarray:
        return np.concatenate([a.ravel() for pair in zip(m.coefs_, m.intercepts_) for a in pair])

    return (flat(client) - flat(model)).astype(np.float32)


def _mlp_init(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[np.ndarray]:
    out = []
    for a, b in zip(sizes, sizes[1:]):
        out += [(rng.standard_normal((a, b)) * np.sqrt(2 / a)).astype(np.float32), np.zeros(b, np.float32)]
    return out


def _mlp_sgd_epoch(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, lr: float, rng) -> None:
    """One epoch of minibatch SGD on a one-hidden-layer ReLU MLP with softmax cross-entropy, in place."""
    w1, b1, w2, b2 = params
    for batch in np.array_split(rng.permutation(len(x)), max(1, len(x) // 32)):
        xb, yb = x[batch], y[batch]
        h = np.maximum(xb @ w1 + b1, 0)
        logits = h @ w2 + b2
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1
        g = p / len(yb)
        gh = (g @ w2.T) * (h > 0)
        w2 -= lr * h.T @ g
        b2 -= lr * g.sum(0)
        w1 -= lr * xb.T @ gh
        b1 -= lr * gh.sum(0)


def ef_accuracy(rounds: int, settings: dict[str, CompressionSettings | None], clients: int = 10) -> list[dict]:
    """FedAvg on digits (numpy MLP 64-128-10, 9,738 parameters, 10 IID clients, one local epoch per round):
    test accuracy with dense updates vs compressed updates with and without error feedback."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:360], order[360:]
    shards = np.array_split(train, clients)
    rows = []
    for name, s in settings.items():
        for feedback in ((False, True) if s is not None else (False,)):
            rng = np.random.default_rng(1)
            glob = _mlp_init(rng, (64, 128, 10))
            sizes = [a.size for a in glob]
            residuals: list[np.ndarray | None] = [None] * clients
            sent_bytes = 0
            for _ in range(rounds):
                flat_glob = np.concatenate([a.ravel() for a in glob])
                total = np.zeros_like(flat_glob)
                for c, shard in enumerate(shards):
                    local = [a.copy() for a in glob]
                    _mlp_sgd_epoch(local, x[shard], y[shard], 0.1, rng)
                    delta = np.concatenate([a.ravel() for a in local]) - flat_glob
                    if s is None:
                        total += delta
                        sent_bytes += 4 * delta.size
                        continue
                    payload, res = encode_update(delta, s, residuals[c] if feedback else None, rng)
                    residuals[c] = res
                    total += decode_update(payload, delta.size)
                    sent_bytes += len(payload)
                new = flat_glob + total / clients
                glob = [a.reshape(g.shape) for a, g in zip(np.split(new, np.cumsum(sizes)[:-1]), glob)]
            w1, b1, w2, b2 = glob
            acc = float(((np.maximum(x[test] @ w1 + b1, 0) @ w2 + b2).argmax(1) == y[test]).mean())
            rows.append({"setting": name, "error_feedback": feedback, "rounds": rounds, "test_accuracy": acc,
                         "upload_bytes_per_update": sent_bytes / rounds / clients})
    return rows


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def measure(delta: np.ndarray, settings: CompressionSettings, reps: int) -> dict:
    n = delta.shape[0]
    dense = 4 * n
    payload, _ = encode_update(delta, settings)
    plain, _ = encode_update(delta, CompressionSettings(**{**settings.to_dict(), "entropy": False}))
    encode_ms = _median_ms(lambda: encode_update(delta, settings), reps)
    decode_ms = _median_ms(lambda: decode_update(payload, n), reps)
    sparse_ms = _median_ms(lambda: decode_sparse(payload, n), reps)
    numpy_ms = _median_ms(lambda: np.frombuffer(delta.tobytes(), dtype=np.float32), reps)
    decoded = decode_update(payload, n)
    mb = dense / 1e6
    return {
        "params": n, "method": settings.method, "density": settings.density, "bits": settings.bits,
        "encoded_bytes": len(payload), "encoded_bytes_no_zlib": len(plain), "dense_fp32_bytes": dense,
        "ratio": dense / len(payload), "encode_ms": encode_ms, "decode_ms": decode_ms,
        "decode_sparse_ms": sparse_ms, "numpy_roundtrip_ms": numpy_ms,
        "encode_MBps": mb / encode_ms * 1e3, "decode_MBps": mb / decode_ms * 1e3, "numpy_MBps": mb / numpy_ms * 1e3,
        "rel_error": float(np.linalg.norm(decoded - delta) / np.linalg.norm(delta)),
    }


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['params'] // 1000}k {r['method']}\n{r['density']:g} {r['bits']}b" for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.7), 8))
    a.bar(labels, [r["ratio"] for r in rows])
    a.axhline(50, color="red", linestyle="--", label="target 50x (top-1% int8)")
    a.set_yscale("log")
    a.set_ylabel("dense fp32 bytes / encoded bytes")
    a.legend()
    x = np.arange(len(rows))
    b.bar(x - 0.2, [r["decode_MBps"] for r in rows], 0.4, label="decode_update")
    b.bar(x + 0.2, [r["numpy_MBps"] for r in rows], 0.4, label="numpy tobytes+frombuffer")
    b.set_xticks(x, labels)
    b.set_yscale("log")
    b.set_ylabel("MB/s of dense-equivalent data")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from protocol.table import print_table

    reps = 5 if args.quick else 30
    rng = np.random.default_rng(0)
    if args.quick:
        source = "synthetic heavy-tailed (Student-t, df=3)"
        deltas = {n: (rng.standard_t(3, n) * 1e-3).astype(np.float32) for n in (100_000, 1_000_000)}
        grid = {100_000: [(d, b) for d in DENSITIES for b in (8, 4)], 1_000_000: [(0.01, 8)]}
    else:
        source = "digits MLP: client fine-tune minus global (scikit-learn)"
        deltas = {n: mlp_delta(hidden) for n, hidden in HIDDEN.items()}
        grid = {n: [(d, b) for d in DENSITIES for b in BITS] for n in deltas}
    rows = []
    for n, delta in deltas.items():
        for density, bits in grid[n]:
            rows.append(measure(delta, CompressionSettings(density=density, bits=bits), reps))
        rows.append(measure(delta, CompressionSettings(method="randk", seed=7, density=0.01, bits=8), reps))
        if not args.quick:
            rows.append(measure(delta, CompressionSettings(method="dense", density=1.0, bits=8), reps))
    print(f"deltas: {source}")
    print_table(rows, ["params", "method", "density", "bits", "encoded_bytes", "ratio", "encode_ms", "decode_ms",
                       "decode_sparse_ms", "numpy_roundtrip_ms", "decode_MBps", "numpy_MBps", "rel_error"])
    _plot(rows, args.out / "codec.png")
    top1 = next(r for r in rows if r["params"] == 1_000_000 and r["method"] == "topk" and r["density"] == 0.01
                and r["bits"] == 8)
    edge = [r for r in rows if r["params"] < 1_000_000 and r["method"] == "topk" and r["density"] == 0.01
            and r["bits"] == 8][0]
    summary = {"top1pct_int8_ratio": top1["ratio"], "decode_1M_1pct_ms": top1["decode_ms"],
               "edge_decode_sparse_per_s": 1e3 / edge["decode_sparse_ms"], "edge_case_params": edge["params"],
               "targets_met": top1["ratio"] >= 50 and top1["decode_ms"] < 5}
    print(summary)
    training = ef_accuracy(10 if args.quick else 60, {
        "dense fp32": None,
        "top-10% int8": CompressionSettings(density=0.1, bits=8),
        "top-1% int8": CompressionSettings(density=0.01, bits=8),
        "top-1% int4": CompressionSettings(density=0.01, bits=4),
    })
    print("FedAvg on digits, compressed updates with and without error feedback:")
    print_table(training)
    return {"delta_source": source, "reps": reps, "cases": rows, "summary": summary, "plot": "codec.png",
            "error_feedback_training": training}
