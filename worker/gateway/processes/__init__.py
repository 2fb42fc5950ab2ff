"""Several gateway processes on one port (see coordinator.py)."""
