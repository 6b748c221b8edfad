"""Capacity stores: one protocol (`base.CapacityStore`), several backends."""

from balancer.capacity.base import CapacityStore, Grant, RegionState, Wait

__all__ = ["CapacityStore", "Grant", "RegionState", "Wait"]
