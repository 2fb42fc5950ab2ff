"""The `worker` command line."""
