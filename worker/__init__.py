"""The Celery worker: the transfer tasks and the once-only effects they make."""
