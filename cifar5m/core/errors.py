"""Every error cifar5m raises on purpose.

Each class also subclasses the builtin a caller would naturally catch
(``except FileNotFoundError`` keeps working), as huggingface_hub does. The CLI
turns any ``Cifar5mError`` into one ``Error: ...`` line in one place
(``cifar5m.cli.main``). Messages name the file or value and say what to do.
"""

from __future__ import annotations


class Cifar5mError(Exception):
    """Base class of every error cifar5m raises on purpose."""


# --- datasets on disk (shards/) -------------------------------------------------------


class DatasetNotFoundError(Cifar5mError, FileNotFoundError):
    """A path given as a dataset has no ``manifest.json``."""


class DatasetExistsError(Cifar5mError, FileExistsError):
    """An output directory already holds a finished dataset."""


class ShardNotFoundError(Cifar5mError, FileNotFoundError):
    """A shard listed in the manifest is missing."""


class CorruptShardError(Cifar5mError, ValueError):
    """A shard is truncated or its tar structure does not match the index."""


class ChecksumMismatchError(Cifar5mError, ValueError):
    """A file's sha256 or size differs from the manifest."""


class ManifestError(Cifar5mError, ValueError):
    """``manifest.json`` or the index is missing fields or inconsistent."""


class ManifestVersionError(ManifestError):
    """The manifest was written by a newer format version than this cifar5m reads, or by an
    older one that needs ``cifar5m upgrade`` first."""


class InvalidImageError(Cifar5mError, ValueError):
    """An image is not 32x32 RGB uint8, or cannot be decoded."""


class InvalidSourceError(Cifar5mError, ValueError):
    """An import source has the wrong layout, keys, shape or dtype."""


class SourceNotFoundError(Cifar5mError, FileNotFoundError):
    """An import source path does not exist."""


class ConfigMismatchError(Cifar5mError, ValueError):
    """An output directory holds (part of) a dataset made with other settings."""


class SampleChecksumError(CorruptShardError):
    """A sample's bytes, as read, do not match the checksum the index records for them."""


class OutputLockedError(Cifar5mError, BlockingIOError):
    """Another process is writing the same output directory (it holds its lock)."""


class DiskFullError(Cifar5mError, OSError):
    """The file system ran out of space (ENOSPC) while writing."""


class SampleNotFoundError(Cifar5mError, KeyError):
    """A key or position that the index does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# --- models (generator/, train/) --------------------------------------------------------


class ModelError(Cifar5mError, ValueError):
    """A model or labeler cannot be loaded, or has the wrong shape or classes."""


# --- streaming (train/) -----------------------------------------------------------------


class NotEnoughSamplesError(Cifar5mError, ValueError):
    """A run asked for more fresh samples than the split holds."""


class StreamConfigError(Cifar5mError, ValueError):
    """A stream's settings do not fit together (batch size vs world size, rank, n, ...)."""


class StreamStateError(Cifar5mError, ValueError):
    """A saved stream state belongs to another stream (seed, batch size, source, ...)."""


# --- serving (dataset_server/) ----------------------------------------------------------


class ServerConfigError(Cifar5mError, ValueError):
    """The server's root or token file is unusable."""


class StoreError(Cifar5mError, OSError):
    """An object store that a served root is on did not answer, or refused a request."""


class DownloadError(Cifar5mError, OSError):
    """A downloaded file does not match the manifest, or the download failed."""


class OfflineError(DownloadError, ConnectionError):
    """A download's host could not be reached at all (no network): callers may go on without."""


# --- generation (generator/) ------------------------------------------------------------


class OutputNotWritableError(Cifar5mError, PermissionError):
    """The output directory cannot be created or written."""


class GenerationError(Cifar5mError, RuntimeError):
    """Generation cannot fill a shard (filters reject too many samples) or ranks disagree."""


class LeaseHeldError(Cifar5mError, BlockingIOError):
    """Another job holds the lease on an object-store output (one writer per output)."""


# --- training (train/) ------------------------------------------------------------------


class TrainConfigError(Cifar5mError, ValueError):
    """A training setting is invalid (world, n, augmentation, steps, ...) or its data is unusable."""
