"""Turns every failure into a JSON answer and counts each request for /stats."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse

from app.errors import ApiError, PayloadTooLarge
from app.runtime import runtime

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Probes are not counted as requests. A failing /health is an answer, not a failure to serve:
# the load balancer and the checks act on it already, and counting it would raise the error rate
# with every probe. Its time is the health check's own deadline at work, not a user's wait:
# counting it would make an idle app's mean latency that of the probes.
PROBE_PATHS = frozenset({"/health"})


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def response_for(exc: BaseException) -> JsonResponse:
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge("request body too large")
    if isinstance(exc, ApiError):
        return json_error(exc.status, exc.message, exc.headers)
    log.error("unhandled error", exc_info=exc)
    return json_error(500, f"internal error: {type(exc).__name__}")


class ApiMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.monotonic()
        stats = runtime(settings.IGOPS_CONFIG).stats
        response = self.get_response(request)
        status = response.status_code
        probe = request.path in PROBE_PATHS
        if not probe:
            stats.bump("requests")
            stats.bump("request_seconds_total", time.monotonic() - started)
        failed = status >= 400 and not probe
        if failed and status >= 500:
            stats.bump("errors")
            if request.method in WRITE_METHODS:
                stats.bump("write_errors")
        elif failed:
            stats.bump("client_errors")
        stats.flush()
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse:
        return response_for(exception)
