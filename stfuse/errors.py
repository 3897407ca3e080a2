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
