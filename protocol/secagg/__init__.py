"""Secure aggregation (Bonawitz et al. 2017, with SecAgg+ sparse graphs of Bell et al. 2020): the edge learns only
the sum of a cohort's updates. Pure state machines (client.py, server.py) plus an MQTT driver (mqtt_driver.py);
see docs/secagg.md."""

from protocol.secagg.client import SecAggClient
from protocol.secagg.config import Graph, SecAggConfig, TrustMode
from protocol.secagg.server import SecAggResult, SecAggServer

__all__ = ["Graph", "SecAggClient", "SecAggConfig", "SecAggResult", "SecAggServer", "TrustMode"]
