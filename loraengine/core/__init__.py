"""The engine: contracts, configuration, the training loop. Imports no built-in plugin."""
