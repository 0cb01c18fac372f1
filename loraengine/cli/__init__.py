"""The ``loraengine`` command line."""
