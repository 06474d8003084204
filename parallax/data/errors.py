"""The error types the data layer raises for bad inputs."""

from __future__ import annotations

__all__ = ["DataError", "TokenizerError"]


class DataError(ValueError):
    """A dataset or tokenizer path, or its contents, cannot be used; the message names the path
    and the problem.

    A ``ValueError`` subclass so callers that already catch ``ValueError`` for bad arguments
    (the CLI does) report it the same way.
    """


class TokenizerError(DataError):
    """A tokenizer directory, one of its files (tokenizer.json, tokenizer_config.json, a chat
    template) or a tokenizer's vocabulary cannot be used; the message names the file or field."""
