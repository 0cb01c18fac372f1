"""Helpers for testing loraengine and its plugins: tiny models, tiny data, fixtures and
conformance suites."""
