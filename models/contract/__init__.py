"""The wire contract shared by the enrollment server and the edge agents (see DESIGN.md, "Wire contract").

Modules, each with one job:

- `topics`: topic names under `faceattend/v1`, subscription filters, parsing, site / device id rules;
- `codec`: the JSON envelope (`schema`, `schema_version`), size limits, strict typed field checks;
- `events`, `status`: the attendance event and the server's `events_stored` confirmation, the edge status and the
  gallery ack payloads;
- `unknown_face`: an unknown visitor's face crop and embedding (edge -> server, opt-in per site);
- `gallery`: the in-memory gallery, its little-endian binary blob, the signed manifest, chunking;
- `signing`: Ed25519 keys, key ids, signatures;
- `assembler`: rebuilds a verified gallery from retained manifest + chunk messages arriving in any order;
- `mqtt_link`: the MQTT client interface and its paho-mqtt implementation.

Nothing is imported here so that `import models.contract.topics` stays cheap (no numpy, no paho, no crypto).
"""
