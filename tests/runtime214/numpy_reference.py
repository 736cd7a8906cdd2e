"""NumPy reference of the firmware models' DP-SGD step (independent of the TFLite graph), for the tests."""

from __future__ import annotations

import numpy as np


def mlp_per_example_grads(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray):
    """(loss per example, per-example grads [(B, *shape)] in layout order) of dense-relu-dense."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    x = np.asarray(x, np.float64)
    h = x @ w1 + b1
    a = np.maximum(h, 0.0)
    z = a @ w2 + b2
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = np.eye(w2.shape[1])[y]
    loss = -np.log(np.sum(p * onehot, axis=1))
    dz = p - onehot
    dh = (dz @ w2.T) * (h > 0)
    return loss, [np.einsum("bi,bo->bio", x, dh), dh, np.einsum("bi,bo->bio", a, dz), dz]


def dp_update(weights, grads, noise, lr, clip, noise_mult, mu=0.0, ref=None, control=None):
    """The DP-SGD step of firmware_models.models.dp_step, on per-example grads: the new weights."""
    batch = grads[0].shape[0]
    norms = np.sqrt(sum(np.sum(g.reshape(batch, -1) ** 2, axis=1) for g in grads))
    factors = 1.0 / np.maximum(1.0, norms / clip)
    out, offset = [], 0
    for w, g in zip(weights, grads):
        size = w.size
        n = noise[offset:offset + size].reshape(w.shape)
        r = ref[offset:offset + size].reshape(w.shape) if ref is not None else w
        c = control[offset:offset + size].reshape(w.shape) if control is not None else 0.0
        offset += size
        dp = (np.tensordot(factors, g, axes=1) + noise_mult * clip * n) / batch
        out.append(w - lr * (dp + mu * (w - r) + c))
    return out


def check_dp_step(model, x, y, grads, noise_mult: float, mu: float, seed: int = 2, lr: float = 0.1) -> None:
    """One TFLite DP step (clip = the median per-example norm, so half the batch is clipped; random FedProx
    reference and SCAFFOLD control) must land within 1e-5 of the NumPy step on the same per-example grads."""
    from protocol.weights import flatten

    weights = model.get_weights()
    norms = np.sqrt(sum(np.sum(g.reshape(len(x), -1) ** 2, axis=1) for g in grads))
    clip = float(np.median(norms))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(model.n_params).astype(np.float32)
    ref = flatten(weights) + rng.normal(0, 0.1, model.n_params).astype(np.float32)
    control = rng.normal(0, 0.01, model.n_params).astype(np.float32)
    want = dp_update([w.astype(np.float64) for w in weights], grads, noise, lr, clip, noise_mult, mu, ref, control)
    model.train_step(x, y, noise, lr=lr, clip=clip, noise_mult=noise_mult, mu=mu, ref_flat=ref, control_flat=control)
    np.testing.assert_allclose(model.get_flat(), flatten(want), rtol=0, atol=1e-5)


def check_poisson_step(model, x, y, grads, noise_mult: float, seed: int = 4, lr: float = 0.1) -> None:
    """One Poisson step split over two `train` calls (accumulate with apply = 0, then apply = 1), with masked-out
    rows in both, divided by an expected batch that is not the row count: within 1e-5 of the NumPy step over the
    masked rows only. `x`, `y`, `grads` hold 2 * capacity rows (both calls see the same weights)."""
    from protocol.weights import flatten

    cap = model.batch_size
    rng = np.random.default_rng(seed)
    mask = (rng.random(2 * cap) < 0.7).astype(np.float32)
    weights = model.get_weights()
    norms = np.sqrt(sum(np.sum(g.reshape(len(x), -1) ** 2, axis=1) for g in grads))
    clip = float(np.median(norms))
    noise = rng.standard_normal(model.n_params).astype(np.float32)
    denom = 0.8 * cap   # the expected batch q * n, fixed before sampling
    kept = [g * mask.reshape(-1, *([1] * (g.ndim - 1))) for g in grads]
    want = dp_update([w.astype(np.float64) for w in weights], kept, noise, lr, clip, noise_mult)
    # dp_update divides by the row count (2 * cap): rescale its step to the expected batch
    want = [w0 + (w1 - w0) * (2 * cap) / denom for w0, w1 in zip(weights, want)]
    model.train_step(x[:cap], y[:cap], None, lr, clip, noise_mult, mask=mask[:cap], denom=denom, apply=False)
    np.testing.assert_array_equal(model.get_flat(), flatten(weights))   # apply = 0 moves nothing
    model.train_step(x[cap:], y[cap:], noise, lr, clip, noise_mult, mask=mask[cap:], denom=denom, apply=True)
    np.testing.assert_allclose(model.get_flat(), flatten(want), rtol=0, atol=1e-5)
