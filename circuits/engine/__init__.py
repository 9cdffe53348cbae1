"""Fast training paths; the hooked model stays the reference for analysis and parity."""
