"""`loraengine sample`."""
