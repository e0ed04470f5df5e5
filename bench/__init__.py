"""Benchmarks of Graft's training path: run each as `.venv/bin/python -m bench.<name>` from the repository
root. Every script prints a markdown table and rewrites its own section of docs/benchmarks.md."""
