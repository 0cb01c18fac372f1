"""`loraengine convert`."""
