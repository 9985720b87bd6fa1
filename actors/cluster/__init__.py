"""Snapyard across several hosts: leases, the snapshot index and the registry."""
