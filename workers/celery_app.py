"""The worker's Celery app, configured from the environment.

Start a worker:  celery -A workers.celery_app worker -Q gpu --concurrency 1
"""

from __future__ import annotations

from graft.config import get_settings
from graft.queueing import make_celery

app = make_celery(get_settings())
