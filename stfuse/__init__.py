"""stfuse: a multi-tenant inference compiler that fuses operators across PyTorch models."""

from . import kernels  # noqa: F401  (registers the stfuse:: custom ops)
from .api import compile
from .backend import Group, backend
from .artifact import load
from .errors import InputError, PassError, StfuseError, TraceError
from .plan import Plan
from .program import FusedProgram
from .runtime import DeadlineExceededError, QueueFullError, Runtime, RuntimeClosedError

__version__ = "0.1.0"

__all__ = ["compile", "backend", "Group", "load", "Runtime", "FusedProgram", "Plan",
           "StfuseError", "TraceError", "InputError", "PassError", "QueueFullError",
           "RuntimeClosedError", "DeadlineExceededError", "__version__"]
