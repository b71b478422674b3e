"""Django settings: a JSON API with no ORM, sessions, admin or templates.

The igops config is loaded here so that a missing or invalid IGOPS_APP_CONFIG
stops the worker at boot with the reason, rather than failing requests.
"""

import secrets

from django.core.exceptions import ImproperlyConfigured

from app.config import ConfigError, load_config_from_env
from app.validation import MAX_IMAGE_BYTES

try:
    IGOPS_CONFIG = load_config_from_env()
except ConfigError as exc:
    raise ImproperlyConfigured(str(exc)) from None

# Django insists on a key, but nothing here is signed (no sessions, CSRF or
# messages), so a per-process random one is enough.
SECRET_KEY = secrets.token_urlsafe(50)
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["app.middleware.ApiMiddleware"]
ROOT_URLCONF = "app.urls"
WSGI_APPLICATION = "app.wsgi.application"
DATABASES: dict = {}
TEMPLATES: list = []

USE_TZ = True
TIME_ZONE = "UTC"
USE_I18N = False

# room for a base64-encoded photo of the largest accepted size plus its JSON
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "app": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        # 4xx answers are the client's business; keep the log for failures
        "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
        "django": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}
