"""`loraengine bucket`."""
