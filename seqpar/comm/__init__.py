"""Collectives over an explicit process group: plain (counted), differentiable, and the state scans
(LASP-2 all-gather, ZeCO all-scan, ring) that sequence parallelism is built from. No model code."""
from . import collectives, differentiable
from .collectives import STATS, counting
from .scan import METHODS, Family, ShardChain, StateScan

__all__ = ["collectives", "differentiable", "STATS", "counting", "METHODS", "Family", "ShardChain", "StateScan"]
