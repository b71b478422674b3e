"""The photo service that igops operates.

Nothing is imported here: `python -m app.loadgen` must start with the standard
library alone, and the Django parts load only through `app.wsgi`.
"""
