"""Fused operators: torch references, Triton kernels, and their torch.library registration."""

from . import ops  # noqa: F401  (registers the stfuse:: custom ops)
