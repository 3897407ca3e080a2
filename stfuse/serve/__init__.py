"""Serving: placement of tenants on replicas (placement.py, place_sim.py)."""

from .placement import PlacementPlan, TenantDesc, describe, plan_placement

__all__ = ["plan_placement", "PlacementPlan", "TenantDesc", "describe"]
