"""`loraengine inspect`."""
