"""Event delivery from the edge: durable outbox, a publisher that keeps each event until the server confirms it."""
