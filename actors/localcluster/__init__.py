"""Throwaway real engines on this machine, for tests and the cluster demo.

Each one starts under a temp dir on loopback, is a context manager, and can be
stopped (and killed) on purpose, so tests can take a part of a cluster away.
"""
