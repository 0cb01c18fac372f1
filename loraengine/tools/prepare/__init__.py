"""`loraengine prepare`."""
