"""Typed errors. Every error names the input (or model, or backend) and what was wrong.

Each subclass also inherits the matching builtin (``ValueError`` for bad data, ``RuntimeError``
for failures of the machinery), so callers that catch builtins keep working.
"""

from __future__ import annotations

__all__ = [
    "CxrkitError",
    "InputError",
    "UnsupportedFormatError",
    "DecodeError",
    "ImageTooLargeError",
    "UnsuitableImageError",
    "ModelError",
    "ModelCardError",
    "IntegrityError",
    "BackendUnavailableError",
    "BackendError",
    "OutOfMemoryError",
    "AccuracyGuardError",
    "QueueFullError",
    "BatchFailedError",
    "DetectorClosedError",
    "DicomNetworkError",
]


class CxrkitError(Exception):
    """Base class of every error cxrkit raises on purpose."""


class InputError(CxrkitError, ValueError):
    """An input item could not be read. ``source`` names the item (path or short description)."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        self.message = message
        super().__init__(f"{source!r}: {message}" if source else message)

    def __reduce__(self):  # keep pickling (multiprocessing, Ray) working with the 2-arg init
        return (type(self), (self.source, self.message))


class UnsupportedFormatError(InputError):
    """The content is not an image format cxrkit reads (sniffed from bytes, not the file name)."""


class DecodeError(InputError):
    """The format is known but the data is corrupt, truncated or inconsistent."""


class ImageTooLargeError(InputError):
    """The image or file exceeds a configured limit (decompression-bomb guard)."""


class UnsuitableImageError(InputError):
    """The image reads, but its header says it is not what the model is for (a lateral view, not
    the chest, not a radiograph, a colour picture): refused by the quality gate with ``strict=True``
    (see ``cxrkit.io.quality``)."""


class ModelError(CxrkitError, ValueError):
    """A model package is missing, malformed or inconsistent."""


class ModelCardError(ModelError):
    """card.json does not validate against the card schema."""


class IntegrityError(ModelError):
    """A weights file, ONNX graph or cached engine does not match its recorded hash."""


class BackendUnavailableError(CxrkitError, RuntimeError):
    """A backend's library or device is missing. The message says what to install."""


class BackendError(CxrkitError, RuntimeError):
    """A backend failed while loading or running a model."""


class OutOfMemoryError(BackendError):
    """A backend ran out of device memory on a batch; the Detector retries with smaller batches."""


class AccuracyGuardError(CxrkitError, RuntimeError):
    """A lower-precision model lost more accuracy than allowed against fp32."""


class QueueFullError(CxrkitError, RuntimeError):
    """A bounded request queue is full (back-pressure)."""


class BatchFailedError(BackendError):
    """The detector raised for a whole micro-batch; ``__cause__`` is its exception."""


class DetectorClosedError(CxrkitError, RuntimeError):
    """A (Batching)Detector was closed before (or while) this request could run."""


class DicomNetworkError(CxrkitError, RuntimeError):
    """A DICOM association or DIMSE exchange failed: the peer refused or aborted the association,
    did not answer, or answered a C-STORE with a failure status (``status`` holds it, else None)."""

    def __init__(self, message: str, status: "int | None" = None) -> None:
        self.status = status
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.status))
