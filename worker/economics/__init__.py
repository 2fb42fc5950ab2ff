"""Workload economics: what each model earned against what its GPUs cost, from the ledger and replica up-time."""
