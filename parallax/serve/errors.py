"""OpenAI-style errors: ``APIError`` (raised anywhere in a request) and the JSON body every error answer has.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

``param`` names the request field at fault, in the client's terms (``messages[0].content``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body", "invalid_request", "pydantic_param"]


class APIError(Exception):
    """An error answer: HTTP ``status`` with an OpenAI error object; ``headers`` go with it (Retry-After,
    WWW-Authenticate)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON object of an error answer."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None) -> APIError:
    """A 400 naming the field at fault."""
    return APIError(400, message, param=param)


def pydantic_param(loc: tuple[str | int, ...]) -> str | None:
    """A pydantic error location as the client wrote the field: ('messages', 0, 'content') ->
    'messages[0].content'; None for the body itself."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else part
    return param or None
