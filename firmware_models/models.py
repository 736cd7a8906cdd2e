"""The firmware models: layer stacks, the DP-SGD step in TF ops, and the tf.Module that becomes a .tflite.

The DP step (`train` calls on fixed-capacity batches of B rows), per parameter tensor w:
    g_b     = gradient of example b's cross-entropy loss          (per example, hand-written backward)
    f_b     = mask_b / max(1, |g_b| / clip)                        (|g_b| = L2 norm over ALL tensors; mask_b in {0, 1})
    s       = acc + sum_b f_b g_b                                  (acc: the clipped sums of earlier chunks)
    dp      = (s + noise_mult * clip * noise) / denom              (noise ~ N(0, 1), an INPUT drawn by the host)
    w      -= apply * lr * (dp + mu * (w - ref) + control)         (FedProx proximal term; SCAFFOLD c - c_i)
    acc     = (1 - apply) * s
Poisson sampling (device.training): each example joins a step independently with probability q; the sampled rows
fill batches of capacity B with mask 1 (padding rows mask 0), a step with more than B sampled rows is split into
chunks called with apply = 0 (accumulate only) and a last one with apply = 1, and `denom` is the EXPECTED batch
q * n, fixed before sampling, so one example moves the noised sum by at most clip whatever was sampled.
With mask = 1, denom = B, apply = 1, noise_mult = 0 and a huge clip it is plain mini-batch SGD. Noise, ref and
control are flat float32 vectors in layout order (`protocol.weights.flatten`), so the device passes them without
knowing tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from firmware_models.layers import AvgPool2, Conv1D, Dense, GlobalAvgPool, Layer, ReLU
from protocol.weights import Layout, TensorSpec

DEFAULT_HYPERPARAMETERS = {"lr": 0.05, "clip": 1.0, "noise_mult": 1.1, "mu": 0.0}


@dataclass(frozen=True)
class ModelSpec:
    """A firmware model's definition (layers, input, classes) from which its weights, layout and TFLite are built."""

    name: str
    family: str
    input_shape: tuple[int, ...]
    n_classes: int
    layers: tuple[Layer, ...]
    device_class: str
    options: dict = field(default_factory=dict)  # the build options, recorded in the manifest
    qat: bool = False  # fake-quantise kernels to int8 in the forward pass (straight-through gradient)

    @property
    def layout(self) -> Layout:
        return [TensorSpec(n, s) for layer in self.layers for n, s in layer.param_specs()]

    def init_weights(self, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [w for layer in self.layers for w in layer.init(rng)]


def wearable_cnn(n_classes: int = 7, timesteps: int = 100, channels: int = 6, filters: int = 16,
                 kernel: int = 5, qat: bool = False, device_class: str = "wearable") -> ModelSpec:
    """IMU windows (2 s at 50 Hz, acc xyz + gyro xyz): conv-relu-avgpool-conv-relu-globalpool-dense."""
    if (timesteps - kernel + 1) % 2 or timesteps < 3 * kernel:
        raise ValueError(f"timesteps={timesteps}: timesteps - kernel + 1 must be even and >= 2 * kernel")
    layers = (Conv1D("conv1", kernel, channels, filters), ReLU(), AvgPool2(),
              Conv1D("conv2", kernel, filters, 2 * filters), ReLU(), GlobalAvgPool(),
              Dense("dense", 2 * filters, n_classes))
    opts = dict(n_classes=n_classes, timesteps=timesteps, channels=channels, filters=filters, kernel=kernel, qat=qat)
    return ModelSpec("wearable_cnn", "cnn1d", (timesteps, channels), n_classes, layers, device_class, opts, qat)


def har_mlp(n_features: int = 561, hidden: int = 64, n_classes: int = 6, qat: bool = False,
            device_class: str = "pi") -> ModelSpec:
    """UCI HAR's 561 engineered features -> 64 -> 6 activities."""
    layers = (Dense("hidden", n_features, hidden), ReLU(), Dense("logits", hidden, n_classes))
    opts = dict(n_features=n_features, hidden=hidden, n_classes=n_classes, qat=qat)
    return ModelSpec("har_mlp", "mlp", (n_features,), n_classes, layers, device_class, opts, qat)


def vitals_mlp(n_features: int = 16, hidden: int = 16, qat: bool = False, device_class: str = "pi") -> ModelSpec:
    """Tabular clinical features (ICU vitals, heart-disease records) -> binary outcome as 2 logits."""
    layers = (Dense("hidden", n_features, hidden), ReLU(), Dense("logits", hidden, 2))
    opts = dict(n_features=n_features, hidden=hidden, qat=qat)
    return ModelSpec("vitals_mlp", "mlp", (n_features,), 2, layers, device_class, opts, qat)


MODELS = {"wearable_cnn": wearable_cnn, "har_mlp": har_mlp, "vitals_mlp": vitals_mlp}


def model_spec(name: str, **options) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](**options)


def fake_quant(w: tf.Tensor) -> tf.Tensor:
    """Symmetric per-tensor int8 rounding of a kernel; used forward only, so its gradient is straight-through."""
    scale = tf.maximum(tf.reduce_max(tf.abs(w)), 1e-8) / 127.0
    return tf.round(w / scale) * scale


def effective_params(spec: ModelSpec, params: list[tf.Tensor]) -> list[tf.Tensor]:
    if not spec.qat:
        return list(params)
    return [fake_quant(p) if s.name.endswith("/kernel") else p for p, s in zip(params, spec.layout)]


def _split_params(spec: ModelSpec, params: list[tf.Tensor]) -> list[list[tf.Tensor]]:
    out, i = [], 0
    for layer in spec.layers:
        n = len(layer.param_specs())
        out.append(params[i:i + n])
        i += n
    return out


def forward(spec: ModelSpec, params: list[tf.Tensor], x: tf.Tensor):
    """Logits, and the per-layer caches the backward pass needs."""
    caches = []
    for layer, p in zip(spec.layers, _split_params(spec, effective_params(spec, params))):
        x, cache = layer.forward(p, x)
        caches.append(cache)
    return x, caches


def per_example_loss(logits: tf.Tensor, y: tf.Tensor, n_classes: int):
    """Cross-entropy per example and d(loss_b)/d(logits_b)."""
    onehot = tf.one_hot(y, n_classes, dtype=tf.float32)
    logp = tf.nn.log_softmax(logits)
    return -tf.reduce_sum(onehot * logp, axis=1), tf.exp(logp) - onehot


def per_example_grads(spec: ModelSpec, params: list[tf.Tensor], x: tf.Tensor, y: tf.Tensor):
    """(loss per example, [PerExample per parameter tensor in layout order])."""
    logits, caches = forward(spec, params, x)
    loss, dy = per_example_loss(logits, y, spec.n_classes)
    grads_by_layer = []
    eff = _split_params(spec, effective_params(spec, params))
    for layer, p, cache in reversed(list(zip(spec.layers, eff, caches))):
        dy, grads = layer.backward(p, cache, dy)
        grads_by_layer.append(grads)
    return loss, [g for grads in reversed(grads_by_layer) for g in grads]


def split_flat(flat: tf.Tensor, layout: Layout) -> list[tf.Tensor]:
    parts = tf.split(flat, [s.size for s in layout])
    return [tf.reshape(p, s.shape) for p, s in zip(parts, layout)]


def dp_step(spec: ModelSpec, params: list[tf.Tensor], x, y, noise, lr, clip, noise_mult, mu, ref, control,
            mask=None, denom=None, apply=None, acc=None):
    """(mean loss of the masked rows before the step, updated parameters, new accumulator): the formula in the
    module docstring. mask None = every row, denom None = B, apply None = 1, acc None = zeros (and not returned)."""
    layout = spec.layout
    loss, grads = per_example_grads(spec, params, x, y)
    norms = tf.sqrt(tf.add_n([g.sq_norms() for g in grads]))
    factors = 1.0 / tf.maximum(1.0, norms / clip)
    if mask is not None:
        factors = factors * mask
    denom = float(x.shape[0]) if denom is None else denom
    accs = split_flat(acc, layout) if acc is not None else [None] * len(params)
    new, kept = [], []
    for w, g, n, r, c, a in zip(params, grads, split_flat(noise, layout), split_flat(ref, layout),
                                split_flat(control, layout), accs):
        total = g.weighted_sum(factors) if a is None else a + g.weighted_sum(factors)
        step = (total + noise_mult * clip * n) / denom + mu * (w - r) + c
        new.append(w - lr * step if apply is None else w - apply * lr * step)
        kept.append(total if apply is None else (1.0 - apply) * total)
    if mask is None:
        mean_loss = tf.reduce_mean(loss)
    else:
        mean_loss = tf.reduce_sum(loss * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
    if acc is None:
        return mean_loss, new
    return mean_loss, new, tf.concat([tf.reshape(k, [-1]) for k in kept], axis=0)


class FirmwareModule(tf.Module):
    """Variables + the signatures the device calls; fixed batch sizes (TFLite wants static shapes)."""

    def __init__(self, spec: ModelSpec, batch_size: int = 32, infer_batch_size: int = 32, seed: int = 0):
        super().__init__(name=spec.name)
        self.spec, self.batch_size, self.infer_batch_size = spec, batch_size, infer_batch_size
        self.layout = spec.layout
        self.n_params = sum(s.size for s in self.layout)
        self.weights = [tf.Variable(w, name=s.name.replace("/", "_"))
                        for w, s in zip(spec.init_weights(seed), self.layout)]
        # clipped per-example gradient sums of a Poisson step's earlier chunks (apply = 0); not part of the layout
        self.acc = tf.Variable(np.zeros(self.n_params, np.float32), name="poisson_acc")
        f32, i32 = tf.float32, tf.int32
        xb = tf.TensorSpec([batch_size, *spec.input_shape], f32, name="x")
        yb = tf.TensorSpec([batch_size], i32, name="y")
        flat = lambda name: tf.TensorSpec([self.n_params], f32, name=name)  # noqa: E731
        # hyperparameters are rank-1 [1], never rank-0: LiteRT 1.4.0's aarch64 wheel segfaults resizing an input to
        # shape [] (what every SignatureRunner call does), docs/litert-aarch64-train-crash.md
        scalar = lambda name: tf.TensorSpec([1], f32, name=name)  # noqa: E731
        self.train = tf.function(self._train, input_signature=[
            xb, yb, tf.TensorSpec([batch_size], f32, name="mask"), flat("noise"), scalar("lr"), scalar("clip"),
            scalar("noise_mult"), scalar("denom"), scalar("apply"), scalar("mu"), flat("ref"), flat("control")])
        self.infer = tf.function(self._infer, input_signature=[
            tf.TensorSpec([infer_batch_size, *spec.input_shape], f32, name="x")])
        self.evaluate = tf.function(self._evaluate, input_signature=[xb, yb])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(self._set_weights, input_signature=[flat("weights")])

    def _train(self, x, y, mask, noise, lr, clip, noise_mult, denom, apply, mu, ref, control):
        lr, clip, noise_mult, denom, apply, mu = (tf.reshape(v, []) for v in (lr, clip, noise_mult, denom, apply, mu))
        loss, new, acc = dp_step(self.spec, [w.read_value() for w in self.weights], x, y, noise, lr, clip,
                                 noise_mult, mu, ref, control, mask=mask, denom=denom, apply=apply,
                                 acc=self.acc.read_value())
        for var, value in zip(self.weights, new):
            var.assign(value)
        self.acc.assign(acc)
        return {"loss": loss}

    def _infer(self, x):
        return {"logits": forward(self.spec, [w.read_value() for w in self.weights], x)[0]}

    def _evaluate(self, x, y):
        """Per-example loss and correctness, so the caller can ignore the padded rows of a last batch."""
        logits = forward(self.spec, [w.read_value() for w in self.weights], x)[0]
        loss, _ = per_example_loss(logits, y, self.spec.n_classes)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.float32)
        return {"loss": loss, "correct": correct}

    def _get_weights(self):
        return {"weights": tf.concat([tf.reshape(w, [-1]) for w in self.weights], axis=0)}

    def _set_weights(self, weights):
        for var, value in zip(self.weights, split_flat(weights, self.layout)):
            var.assign(value)
        self.acc.assign(tf.zeros_like(weights))   # a new round never inherits a split step's partial sums
        return {"n_params": tf.constant(self.n_params, tf.int32)}

    def signatures(self) -> dict:
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}


SIGNATURES = ("train", "infer", "evaluate", "get_weights", "set_weights")


def keras_model(name: str, weights: list[np.ndarray] | None = None, **options):
    """A Keras model with the same forward pass and weight layout (order and shapes) as the firmware model."""
    import keras

    spec = model_spec(name, **options)
    model = keras.Sequential([keras.Input(spec.input_shape), *(layer.keras() for layer in spec.layers)], name=name)
    model.set_weights(weights if weights is not None else spec.init_weights(0))
    return model
