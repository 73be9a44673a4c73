"""Size limits of the wire contract, in one place so that writers and readers agree.

Every reader checks the size of a payload before parsing it: a broker delivers whatever any authorised client
published, and a bounded reader is what keeps a malformed or hostile message from exhausting an edge's memory.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB

# JSON payloads. An event or status is a few hundred bytes; 64 KiB leaves room for health figures and future
# minor-version fields while staying far below what could hurt a Jetson.
MAX_EVENT_BYTES = 64 * KIB
MAX_STATUS_BYTES = 64 * KIB
MAX_ACK_BYTES = 64 * KIB
MAX_STORED_BYTES = 64 * KIB
# event ids in one `events_stored` confirmation: 1000 canonical UUIDs are about 39 KiB of JSON
MAX_STORED_IDS = 1000
# An unknown visitor's face: a small JPEG crop (base64) and a 128-d embedding; the crop itself is capped below.
MAX_UNKNOWN_FACE_BYTES = 256 * KIB
MAX_UNKNOWN_CROP_BYTES = 160 * KIB
# The manifest lists one sha256 per chunk: 4096 chunks x 67 bytes ("<64 hex>",) is about 270 KiB, so the
# manifest cannot live under the 64 KiB of the other payloads.
MAX_MANIFEST_BYTES = 512 * KIB

# Gallery publication.
MAX_CHUNK_SIZE = 1 * MIB  # one MQTT message; brokers are configured with max_packet_size above this
DEFAULT_CHUNK_SIZE = 256 * KIB
MAX_CHUNK_COUNT = 4096
MAX_BLOB_BYTES = 512 * MIB  # about 1M float32 embeddings of dimension 128
MAX_DIM = 4096

# Strings inside payloads.
MAX_ID_CHARS = 64  # site and device ids (also bounded by the topic id pattern)
MAX_PERSON_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_CAMERA_CHARS = 64
MAX_FINGERPRINT_CHARS = 128
MAX_SNAPSHOT_CHARS = 512
MAX_VERSION_CHARS = 64
MAX_ERROR_CHARS = 1024

# Edge health figures: a small tree of numbers and strings, never a dump.
MAX_HEALTH_ENTRIES = 256  # all levels together
MAX_HEALTH_DEPTH = 3
MAX_HEALTH_KEY_CHARS = 64
MAX_HEALTH_STR_CHARS = 256
