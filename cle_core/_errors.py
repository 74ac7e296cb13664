"""Typed errors. Every user-facing failure is a :class:`CLEError`."""

from __future__ import annotations


class CLEError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidGraphError(CLEError):
    """The layer graph is malformed: a cycle, a dangling value, a shape mismatch."""


class NonFiniteError(CLEError):
    """A weight, bias or batch-norm statistic holds NaN or Inf."""


class UnsupportedModelError(CLEError):
    """No backend claims the model, or a backend cannot translate it."""


class ExecutionError(CLEError):
    """The NumPy reference executor cannot run a node."""
