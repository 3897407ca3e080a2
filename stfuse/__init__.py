"""stfuse: a multi-tenant inference compiler that fuses operators across PyTorch models."""

from . import kernels  # noqa: F401  (registers the stfuse:: custom ops)
from .api import compile
from .artifact import load
from .errors import InputError, PassError, StfuseError, TraceError
from .program import FusedProgram, Plan

__version__ = "0.1.0"

__all__ = ["compile", "load", "FusedProgram", "Plan", "StfuseError", "TraceError", "InputError",
           "PassError", "__version__"]
