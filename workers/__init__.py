"""Graft workers: the Celery app, its tasks, and the PyTorch training code they run."""
