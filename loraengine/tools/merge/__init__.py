"""`loraengine merge`."""
