"""Event delivery from the edge: durable outbox, PUBACK-gated publisher, snapshots."""
