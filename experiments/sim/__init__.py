"""The in-process simulator: up to thousands of devices, their edges and the cloud in one process, on a virtual clock.

It drives the project's real code paths (device.training + device.runtime's TFLite interpreter, protocol.compression,
protocol.messages with Ed25519 signatures, edge.validation + edge.aggregate, cloud.strategies, cloud.accounting);
only the transport (MQTT) is replaced by direct calls, and time by a virtual clock fed by a heterogeneity model.
"""

from experiments.sim.hetero import HeteroConfig, Profile, draw_profiles
from experiments.sim.methods import METHODS, Method
from experiments.sim.simulator import RoundLog, SimConfig, Simulator

__all__ = ["METHODS", "HeteroConfig", "Method", "Profile", "RoundLog", "SimConfig", "Simulator", "draw_profiles"]
