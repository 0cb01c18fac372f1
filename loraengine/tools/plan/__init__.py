"""`loraengine plan`."""
