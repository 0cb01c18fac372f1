"""The training step and loop, the state a resume restores, checkpoints, the watchdog
and the signal guard."""
