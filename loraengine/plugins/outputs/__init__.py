"""Built-in outputs: the loss plot and preview grids, as lifecycle plugins."""
