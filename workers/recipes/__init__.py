"""Training recipes: one module per job type, pure PyTorch. A recipe takes a validated config and a
reporter; it imports neither the database nor Celery."""
