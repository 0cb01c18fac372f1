"""Features beside the engine, one folder each: the logic and its click command."""
