"""Errors as OpenAI shapes them: {"error": {"message", "type", "code", "param"}} with the matching HTTP status."""
from __future__ import annotations

from typing import Optional


class APIError(Exception):
    """An error the client caused (4xx) or the server's state (503), with its OpenAI type and code."""

    def __init__(self, status: int, message: str, code: str, *, param: Optional[str] = None,
                 error_type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "invalid_request_error", 503: "server_overloaded", 500: "internal_server_error"}


def bad_request(message: str, code: str = "invalid_request", param: Optional[str] = None) -> APIError:
    return APIError(400, message, code, param=param)
