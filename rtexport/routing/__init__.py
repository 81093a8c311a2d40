"""Routers, gates, and the routed model wrapper."""

from .config import RouterConfig, default_routed_layers, parse_layers
from .routed import RoutedDecoderLayer, RoutedModel, RoutingState
from .router import Router, masked_mean, straight_through_gate

__all__ = [
    "Router",
    "RouterConfig",
    "RoutedDecoderLayer",
    "RoutedModel",
    "RoutingState",
    "default_routed_layers",
    "masked_mean",
    "parse_layers",
    "straight_through_gate",
]
