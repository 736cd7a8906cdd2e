"""The centralized baseline: the same architecture trained on the pooled data, no privacy, no compression.

It is the yardstick for "percent of centralized accuracy" in the demo report and the experiments.
"""

from __future__ import annotations

import numpy as np

from experiments.datasets import Federation


def centralized_accuracy(fed: Federation, epochs: int = 30, batch_size: int = 32, lr: float = 1e-3,
                         seed: int = 0) -> float:
    import keras

    keras.utils.set_random_seed(seed)
    from firmware_models import keras_model

    model = keras_model(fed.model, **fed.model_options)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x, y = fed.pooled()
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    logits = model.predict(fed.x_test, verbose=0, batch_size=256)
    return float(np.mean(np.argmax(logits, axis=1) == fed.y_test))
