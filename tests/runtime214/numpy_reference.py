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
    """The DP-SGD step of firmware_models.models.dp_step, on per-example grads; returns the new weights."""
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
    return out, norms
