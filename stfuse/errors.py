"""Errors raised by stfuse. Every user-facing failure is a StfuseError (or a subclass)."""

from __future__ import annotations


class StfuseError(Exception):
    """Base class: bad input, untraceable model, failed pass, unloadable artifact."""


class TraceError(StfuseError):
    """A tenant model could not be traced by torch.export nor torch.fx."""


class InputError(StfuseError, ValueError):
    """A call's inputs do not match what the tenant was compiled for."""


class PassError(StfuseError):
    """A compiler pass failed; the message names the pass and the passes that ran before it."""


class ArtifactError(StfuseError):
    """An artifact cannot be written, or is missing, corrupt, tampered with or too new."""


# The runtime's (stfuse.runtime re-exports them)


class QueueFullError(StfuseError):
    """submit() found the tenant's queue full (and, with block=True, it stayed full until the timeout),
    or the tenant over its rate limit."""


class DeadlineExceededError(StfuseError):
    """The request was shed: queued so long that it could no longer meet its deadline (its tenant's SLO)."""


class RuntimeClosedError(StfuseError):
    """submit() after close(), or a blocked submit() interrupted by close()."""
