"""The in-process simulator: up to thousands of devices, their edges and the cloud in one process, on a virtual clock.

It drives the tiers' own code (device.training, device.update and protocol.global_model with the TFLite interpreter,
edge.engine.EdgeEngine, cloud.engine.CloudEngine); only the transport (MQTT) is replaced by direct calls, and time by
a virtual clock fed by a heterogeneity model.
"""

from experiments.sim.hetero import HeteroConfig, Profile, draw_profiles
from experiments.sim.methods import METHODS, Method
from experiments.sim.simulator import RoundLog, SimConfig, Simulator

__all__ = ["METHODS", "HeteroConfig", "Method", "Profile", "RoundLog", "SimConfig", "Simulator", "draw_profiles"]
