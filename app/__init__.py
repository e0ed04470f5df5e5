"""Graft: a self-hosted REST service for transfer learning."""

__version__ = "0.1.0"
