"""HTTP in and out; the work itself is in app.service."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from app.errors import MethodNotAllowed, NotFound
from app.middleware import json_error
from app.runtime import Runtime, health_checker, runtime
from app.validation import (
    optional_caption,
    parse_id,
    parse_json_object,
    parse_limit,
    parse_token,
    require_image,
    require_object_id,
    require_username,
)

DEFAULT_FEED_LIMIT = 20
# The release directory this worker loaded the code from (releases/<id> under `current`), so a
# deploy can tell when reloaded workers serve the new release.
RELEASE = Path(__file__).resolve().parent.parent.name


def endpoint(*methods: str, authenticated: bool = False) -> Callable:
    """Checks the method and, for authenticated endpoints, resolves the token
    to a user id passed to the view as `user_id`."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def handle(request: HttpRequest, **kwargs) -> HttpResponse:
            if request.method not in methods:
                raise MethodNotAllowed(request.method, methods)
            current = runtime(settings.IGOPS_CONFIG)
            if authenticated:
                token = parse_token(request.headers.get("Authorization"))
                kwargs["user_id"] = current.service.authenticate(token)
            return view(request, current, **kwargs)

        return handle

    return decorate


@endpoint("POST")
def users(request: HttpRequest, current: Runtime) -> HttpResponse:
    username = require_username(parse_json_object(request.body))
    return JsonResponse(current.service.sign_up(username), status=201)


@endpoint("GET")
def user_detail(request: HttpRequest, current: Runtime, user_ref: str) -> HttpResponse:
    return JsonResponse(current.service.get_user(parse_id(user_ref, "user id")))


@endpoint("POST", authenticated=True)
def follow(request: HttpRequest, current: Runtime, user_id: int) -> HttpResponse:
    followee_id = require_object_id(parse_json_object(request.body), "user_id")
    created = current.service.follow(user_id, followee_id)
    return JsonResponse(
        {"user_id": user_id, "followee_id": followee_id, "created": created}, status=201 if created else 200
    )


@endpoint("POST", authenticated=True)
def photos(request: HttpRequest, current: Runtime, user_id: int) -> HttpResponse:
    payload = parse_json_object(request.body)
    caption = optional_caption(payload)
    image = require_image(payload)
    return JsonResponse(current.service.post_photo(user_id, caption, image), status=201)


@endpoint("GET")
def photo_detail(request: HttpRequest, current: Runtime, photo_ref: str) -> HttpResponse:
    return JsonResponse(current.service.get_photo(parse_id(photo_ref, "photo id")))


@endpoint("GET")
def photo_image(request: HttpRequest, current: Runtime, photo_ref: str) -> HttpResponse:
    image, content_type = current.service.photo_image(parse_id(photo_ref, "photo id"))
    return HttpResponse(image, content_type=content_type)


@endpoint("POST", authenticated=True)
def like(request: HttpRequest, current: Runtime, user_id: int, photo_ref: str) -> HttpResponse:
    photo_id = parse_id(photo_ref, "photo id")
    created = current.service.like(user_id, photo_id)
    return JsonResponse({"photo_id": photo_id, "user_id": user_id, "created": created}, status=201 if created else 200)


@endpoint("GET", authenticated=True)
def feed(request: HttpRequest, current: Runtime, user_id: int) -> HttpResponse:
    limit = parse_limit(request.GET.get("limit"), DEFAULT_FEED_LIMIT, settings.IGOPS_CONFIG.redis.feed_length)
    photos_in_feed = current.service.feed(user_id, limit)
    return JsonResponse({"user_id": user_id, "count": len(photos_in_feed), "photos": photos_in_feed})


@endpoint("GET")
def health(request: HttpRequest, current: Runtime) -> HttpResponse:
    healthy, checks = health_checker(settings.IGOPS_CONFIG).run(current.directory.cached)
    return JsonResponse(
        {"status": "ok" if healthy else "fail", "release": RELEASE, "checks": checks}, status=200 if healthy else 503
    )


@endpoint("GET")
def stats(request: HttpRequest, current: Runtime) -> HttpResponse:
    return JsonResponse(current.stats.read())


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return json_error(NotFound.status, f"no such endpoint: {request.method} {request.path}")


def server_error(request: HttpRequest) -> HttpResponse:
    return json_error(500, "internal error")


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return json_error(400, "bad request")
