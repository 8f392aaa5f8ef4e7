"""The package version: its one home (pyproject reads it, weights files record it)."""

__version__ = "0.1.0"
