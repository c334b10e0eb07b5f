"""Aggregation math, one strategy per file; pure numpy (no torch, no Flower). The contract is in ``base``."""

from .base import SiteUpdate, Strategy, StrategyOptionError, available, get_strategy
from .fedavg import FedAvg

__all__ = ["FedAvg", "SiteUpdate", "Strategy", "StrategyOptionError", "available", "get_strategy"]
