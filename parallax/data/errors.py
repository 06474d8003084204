"""The one error type the data layer raises for bad inputs."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset path or its contents cannot be used; the message names the path and the problem.

    A ``ValueError`` subclass so callers that already catch ``ValueError`` for bad arguments
    (the CLI does) report it the same way.
    """
