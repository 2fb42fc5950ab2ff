"""The worker's own child processes: the framed RPC it speaks with them and the supervisor that restarts them."""
