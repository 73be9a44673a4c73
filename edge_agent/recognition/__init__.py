"""Per-frame recognition on the edge: inference worker, tracker, per-track vote, attendance gate, latency figures."""
