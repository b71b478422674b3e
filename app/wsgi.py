"""WSGI entry point: gunicorn app.wsgi:application, run from the release directory."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "app.settings")

application = get_wsgi_application()

# gunicorn runs without --preload, so each worker it boots loads this module itself: one count
# per worker start, which /stats shows as `worker_starts` and a deploy's canary analysis reads as
# worker restarts (a worker that crashed, or that gunicorn killed for its timeout, is replaced).
from django.conf import settings  # noqa: E402 - only once Django is set up

from app.stats import count_worker_start  # noqa: E402

count_worker_start(settings.IGOPS_CONFIG.stats.path)
