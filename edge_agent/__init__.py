"""The per-door edge agent (camera -> detect -> track -> encode -> match -> events)."""
