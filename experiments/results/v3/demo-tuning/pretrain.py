"""Probe (issue 15 demo target): the demo's DP federation starting from a model pretrained, without privacy, on the
2 consented public subjects' LABELED windows, scored on watch's validation split with sim.py's `run` (the demo's
defaults otherwise). Pretraining: the firmware model in Keras, Adam at LR, batch 32, EPOCHS epochs from
keras.utils.set_random_seed(seed). Not adopted (EXPERIMENTS.md "The demo's defaults"). Run from the repository root:
  PYTHONPATH=. .venv/bin/python experiments/results/v3/demo-tuning/pretrain.py EPOCHS LR SEEDS >> pretrain.jsonl
"""
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np

import experiments.sim.harness as harness
from experiments.datasets import load
from firmware_models import keras_model
from protocol.weights import flatten

spec = importlib.util.spec_from_file_location("demo_sim", Path(__file__).with_name("sim.py"))
demo_sim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_sim)

epochs, lr, seeds = int(sys.argv[1]), float(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
fed = load("watch")
public = fed.clients[:demo_sim.Candidate().public_subjects]
x_public = np.concatenate([c.x for c in public]).astype(np.float32)
y_public = np.concatenate([c.y for c in public]).astype(np.int64)
validation = replace(fed, clients=fed.clients[len(public):]).validation_split(0.15, 0)   # sim.py's evaluation set
for seed in seeds:
    keras.utils.set_random_seed(seed)
    model = keras_model(fed.model, **fed.model_options)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_public, y_public, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    pretrained = flatten(model.get_weights())
    start_accuracy = float(np.mean(np.argmax(model.predict(validation.x_test, verbose=0), 1) == validation.y_test))
    harness.initial_weights = lambda *_, w=pretrained, **__: w   # the simulator's cloud starts from these weights
    print(json.dumps({"epochs": epochs, "lr": lr, "pretrained_accuracy": start_accuracy,
                      **demo_sim.run(demo_sim.Candidate(), seed)}), flush=True)
