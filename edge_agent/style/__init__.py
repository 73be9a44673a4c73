"""Offline stylisation of snapshots in an idle, low-priority child process."""
