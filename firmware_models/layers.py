"""Layers with hand-written forward and backward passes that convert to builtin-only TFLite.

Why by hand: autodiff through `tf.nn.relu` or `conv1d` needs Flex ops, and DP-SGD needs per-example gradients.
Each layer's `backward` returns the input gradient and, per parameter, a `PerExample` gradient that can give the
per-example squared L2 norms and the clip-weighted sum over the batch. For 2-D dense layers the per-example
gradient is the outer product x_b (x) g_b, so its norm is |x_b|^2 |g_b|^2 and the weighted sum is one matmul:
the B x in x out tensor is never materialised (exact, not an approximation). Conv weights use the Keras layout
(kernel, in, out), so a Keras model with the same layers holds the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf


class PerExample:
    """Per-example gradients of one parameter for a batch."""

    def sq_norms(self) -> tf.Tensor:  # (B,)
        raise NotImplementedError

    def weighted_sum(self, factors: tf.Tensor) -> tf.Tensor:  # sum_b factors[b] * g_b, parameter-shaped
        raise NotImplementedError


@dataclass
class Outer(PerExample):
    """g_b = a_b (x) d_b for a dense kernel on (B, in) inputs."""

    a: tf.Tensor  # (B, in)
    d: tf.Tensor  # (B, out)

    def sq_norms(self) -> tf.Tensor:
        return tf.reduce_sum(tf.square(self.a), axis=1) * tf.reduce_sum(tf.square(self.d), axis=1)

    def weighted_sum(self, factors: tf.Tensor) -> tf.Tensor:
        return tf.matmul(self.a * factors[:, None], self.d, transpose_a=True)


@dataclass
class Materialized(PerExample):
    """Materialised per-example gradients, shape (B, *param_shape)."""

    g: tf.Tensor

    def sq_norms(self) -> tf.Tensor:
        flat = tf.reshape(self.g, [self.g.shape[0], -1])
        return tf.reduce_sum(tf.square(flat), axis=1)

    def weighted_sum(self, factors: tf.Tensor) -> tf.Tensor:
        flat = tf.reshape(self.g, [self.g.shape[0], -1])
        summed = tf.matmul(factors[None, :], flat)
        return tf.reshape(summed, self.g.shape[1:])


class Layer:
    """A layer: parameter specs, forward (returns output and a cache), backward (input grad, PerExample grads)."""

    def param_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return []

    def init(self, rng: np.random.Generator) -> list[np.ndarray]:
        return []

    def forward(self, params: list[tf.Tensor], x: tf.Tensor):
        raise NotImplementedError

    def backward(self, params: list[tf.Tensor], cache, dy: tf.Tensor) -> tuple[tf.Tensor, list[PerExample]]:
        raise NotImplementedError

    def keras(self):
        raise NotImplementedError


def _glorot(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


@dataclass
class Dense(Layer):
    """Fully connected layer whose per-example kernel gradients stay outer products (Outer) until DP-SGD needs them."""

    name: str
    n_in: int
    n_out: int

    def param_specs(self):
        return [(f"{self.name}/kernel", (self.n_in, self.n_out)), (f"{self.name}/bias", (self.n_out,))]

    def init(self, rng):
        return [_glorot(rng, (self.n_in, self.n_out), self.n_in, self.n_out), np.zeros(self.n_out, np.float32)]

    def forward(self, params, x):
        w, b = params
        return tf.matmul(x, w) + b, x

    def backward(self, params, x, dy):
        w, _ = params
        dx = tf.matmul(dy, w, transpose_b=True)
        return dx, [Outer(x, dy), Materialized(dy)]

    def keras(self):
        import keras

        return keras.layers.Dense(self.n_out, name=self.name)


@dataclass
class Conv1D(Layer):
    """'valid' 1-D convolution, stride 1, as im2col: concat of k shifted slices, then one matmul."""

    name: str
    kernel: int
    c_in: int
    c_out: int

    def param_specs(self):
        return [(f"{self.name}/kernel", (self.kernel, self.c_in, self.c_out)), (f"{self.name}/bias", (self.c_out,))]

    def init(self, rng):
        k, ci, co = self.kernel, self.c_in, self.c_out
        return [_glorot(rng, (k, ci, co), k * ci, k * co), np.zeros(co, np.float32)]

    def forward(self, params, x):
        w, b = params
        t_out = x.shape[1] - self.kernel + 1
        patches = tf.concat([x[:, j:j + t_out, :] for j in range(self.kernel)], axis=-1)  # (B, T', k*c_in)
        flat = tf.reshape(patches, [-1, self.kernel * self.c_in])
        y = tf.matmul(flat, tf.reshape(w, [self.kernel * self.c_in, self.c_out]))
        return tf.reshape(y, [-1, t_out, self.c_out]) + b, patches

    def backward(self, params, patches, dy):
        w, _ = params
        batch, t_out, _ = dy.shape
        kc = self.kernel * self.c_in
        dpatches = tf.reshape(tf.matmul(tf.reshape(dy, [batch * t_out, self.c_out]),
                                        tf.reshape(w, [kc, self.c_out]), transpose_b=True), [batch, t_out, kc])
        # col2im: slice j of the patches came from input rows j .. j+T'-1.
        dx = tf.add_n([
            tf.pad(dpatches[:, :, j * self.c_in:(j + 1) * self.c_in], [[0, 0], [j, self.kernel - 1 - j], [0, 0]])
            for j in range(self.kernel)
        ])
        gw = tf.matmul(patches, dy, transpose_a=True)  # (B, k*c_in, c_out): per-example kernel gradients
        gw = tf.reshape(gw, [batch, self.kernel, self.c_in, self.c_out])
        return dx, [Materialized(gw), Materialized(tf.reduce_sum(dy, axis=1))]

    def keras(self):
        import keras

        return keras.layers.Conv1D(self.c_out, self.kernel, padding="valid", name=self.name)


class ReLU(Layer):
    """Plain RELU forward; the backward mask is written out, so no ReluGrad (a Flex op) is ever needed."""

    def forward(self, params, x):
        return tf.nn.relu(x), x

    def backward(self, params, x, dy):
        return dy * tf.cast(x > 0.0, tf.float32), []

    def keras(self):
        import keras

        return keras.layers.ReLU()


class AvgPool2(Layer):
    """Average pooling over time with window and stride 2 (the time length must be even)."""

    def forward(self, params, x):
        _, steps, ch = x.shape
        return tf.reduce_mean(tf.reshape(x, [-1, steps // 2, 2, ch]), axis=2), None

    def backward(self, params, cache, dy):
        batch, half, ch = dy.shape
        return tf.reshape(tf.stack([dy, dy], axis=2) * 0.5, [batch, half * 2, ch]), []

    def keras(self):
        import keras

        return keras.layers.AveragePooling1D(2)


class GlobalAvgPool(Layer):
    """Mean over time before the classifier head; backward spreads the gradient evenly over the time steps."""

    def forward(self, params, x):
        return tf.reduce_mean(x, axis=1), x.shape[1]

    def backward(self, params, steps, dy):
        return dy[:, None, :] * tf.ones([1, steps, 1], tf.float32) / float(steps), []

    def keras(self):
        import keras

        return keras.layers.GlobalAveragePooling1D()
