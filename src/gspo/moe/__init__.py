"""Mixture-of-Experts support: router capture, Routing Replay and expert volatility (GSPO section 5.3)."""

from gspo.moe.routing import (
    SUPPORTED_ARCHITECTURES,
    ReplayStats,
    RoutingRecord,
    capture_routing,
    replay_routing,
    supports_routing,
)
from gspo.moe.volatility import expert_volatility, token_volatility

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ReplayStats",
    "RoutingRecord",
    "capture_routing",
    "expert_volatility",
    "replay_routing",
    "supports_routing",
    "token_volatility",
]
