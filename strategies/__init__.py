"""Aggregation math, one strategy per file; pure numpy (no torch, no Flower)."""

from .base import SiteUpdate, Strategy, get_strategy
from .fedavg import FedAvg

__all__ = ["FedAvg", "SiteUpdate", "Strategy", "get_strategy"]
