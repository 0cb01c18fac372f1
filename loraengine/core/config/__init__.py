"""Configuration: the root model built from the installed plugins, shared option bases,
and the YAML source with line numbers for errors."""
