"""Snapyard across several hosts: leases, the snapshot index and the registry, and
what a host needs to be one of a cluster's (its lease, its snapshot shipping, its waker)."""
