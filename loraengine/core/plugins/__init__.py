"""Plugin contracts: typed hookspecs, spec records, the host that loads plugins and the
frozen registry it produces."""
