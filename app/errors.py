"""Failures that map to an HTTP status; the middleware turns them into JSON."""


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401

    def __init__(self, message: str):
        super().__init__(message, {"WWW-Authenticate": "Token"})


class NotFound(ApiError):
    status = 404


class MethodNotAllowed(ApiError):
    status = 405

    def __init__(self, method: str, allowed: tuple[str, ...]):
        super().__init__(f"method {method} not allowed; use {', '.join(allowed)}", {"Allow": ", ".join(allowed)})


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class ServiceUnavailable(ApiError):
    """A dependency stayed unreachable past the retry budget; the client may retry."""

    status = 503
