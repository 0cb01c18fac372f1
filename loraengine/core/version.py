"""The package version, kept in core so the engine can stamp files without importing
the package root."""

__version__ = "0.1.0"
