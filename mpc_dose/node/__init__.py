"""Nodes: the roles that speak the protocol (controller, plant/pumps). Message in ->
messages out; no sockets, no clocks, no sleeps."""

from .controller_node import ControllerNode, PumpRoute
from .plant_node import PlantNode

__all__ = ["ControllerNode", "PumpRoute", "PlantNode"]
