"""What a host needs to be one of a cluster's: its lease, its snapshot shipping, its waker."""
