"""Helpers shared by every stage: user-facing errors, CLI wrapping, atomic I/O, config loading."""
