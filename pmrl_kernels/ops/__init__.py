"""Kernel backends, one module per kernel family (launchers, op registration, autograd)."""
