"""The edge's health: retained MQTT status with the offline will, and the optional Prometheus endpoint."""
