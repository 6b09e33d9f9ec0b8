"""Input items -> ``LoadedImage``: paths, bytes, numpy arrays and pydicom Datasets.

Every failure is an ``InputError`` subclass naming the item; nothing else escapes ``load_item``.
Size limits are checked before decoding: file bytes against ``limits.max_file_bytes``, and
h * w from the JPEG/PNG/DICOM header (and from a compressed DICOM frame's own codestream header)
against ``limits.max_pixels``. Reading a DICOM (parse + frame decode) runs under
``limits.decode_timeout_s``; JPEG/PNG bytes stay encoded and carry ``limits`` to ``decode_pixels``.

Arrays are not copied when already contiguous. Their value range: uint8 (0, 255), uint16
(0, 65535), float32 (0, 1) when all values lie in [0, 1], else (min, max) with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat as _stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np

from cxrkit.config import Limits
from cxrkit.errors import DecodeError, ImageTooLargeError, InputError, UnsupportedFormatError
from cxrkit.io.deadline import call_with_deadline
from cxrkit.io.image import LoadedImage, header_value_range, luminance_u8
from cxrkit.io.sniff import MAX_JPEG_SCANS, SNIFF_BYTES, jpeg_header, png_header, sniff

__all__ = ["load_item", "read_bytes", "iter_sources", "describe_item", "Item"]

logger = logging.getLogger(__name__)

Item = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]


_DTYPE_NAMES: dict[np.dtype, str] = {}  # str(dtype) is Python code in numpy 2: ~1 µs a call


def describe_item(item: Any, index: int) -> str:
    """The ``source`` label: the path, or '<bytes 12345 B #3>', '<ndarray uint16 (h, w) #0>'..."""
    if isinstance(item, np.ndarray):  # first: os.PathLike below is an ABC, slow to test
        dt = item.dtype
        name = _DTYPE_NAMES.get(dt)
        if name is None:
            name = _DTYPE_NAMES[dt] = str(dt)
        return f"<ndarray {name} {tuple(item.shape)} #{index}>"
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<bytes {memoryview(item).nbytes} B #{index}>"
    if _is_dataset(item):
        from cxrkit.io.dicom import describe_dataset

        return describe_dataset(item, index)
    if isinstance(item, LoadedImage):
        return item.source
    return f"<{type(item).__name__} #{index}>"


def _is_dataset(item: Any) -> bool:
    pydicom = sys.modules.get("pydicom")  # a Dataset exists only if pydicom is already imported
    return pydicom is not None and isinstance(item, pydicom.Dataset)


def load_item(item: Item, index: int, *, limits: Limits = Limits(), voi_window_index: int = 0,
              keep_j2k_frame: bool = False, strict: bool = False, source: str | None = None) -> LoadedImage:
    """Read one input item; JPEG/PNG stay encoded (header parsed), DICOM and arrays are decoded.

    item: a path (str / os.PathLike), bytes-like file content, a numpy array (2-D uint8 / uint16 /
    float32, or (h, w, 3|4) uint8 RGB(A)), or a pydicom Dataset. ``index`` is the item's position
    in the caller's list. Raises only ``InputError`` subclasses. ``keep_j2k_frame``: a JPEG 2000
    DICOM with a linear gray mapping is NOT decoded on the CPU: it carries its frame bytes and
    stored-unit range for the GPU decoder (cxrkit.io.dicom_j2k), ``pixels`` None, io's
    ``value_range`` and meta, and ``decode_fallback`` to decode it on the CPU on demand.

    ``strict``: a DICOM whose header says it is not a frontal chest radiograph (lateral view,
    another body part, MG/XA/... modality, colour) raises ``UnsuitableImageError`` before it is
    decoded; without ``strict`` it is read and each such finding is a warning (and a code in
    ``meta["header_issues"]``). See ``cxrkit.io.quality``. JPEG/PNG/arrays have no header to check.

    ``source``: the item's label in the result and in errors (default ``describe_item(item, index)``),
    e.g. the path of file content that was read with :func:`read_bytes`.

    A ``LoadedImage`` (what this function returned before) passes through as it is, with ``index``
    (and ``source``, if given) set: a caller that needs the pixels too (the DICOM node renders them
    into its Secondary Capture) reads an image once and hands that to the Detector. The options it
    was read with stay its own.
    """
    if isinstance(item, LoadedImage):
        changes = {k: v for k, v in (("index", index), ("source", source)) if v is not None and getattr(item, k) != v}
        return dataclasses.replace(item, **changes) if changes else item
    if source is None:
        source = describe_item(item, index)
    try:
        return _load(item, source, index, limits, (voi_window_index, keep_j2k_frame, strict))
    except InputError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError(source, "out of memory while reading the item") from exc
    except Exception as exc:  # a safety net: a malformed item must not escape as a bare exception
        logger.debug("unexpected error reading %s", source, exc_info=True)
        raise DecodeError(source, f"unexpected {type(exc).__name__} while reading: {exc}") from exc


def read_bytes(path: "str | os.PathLike[str]", *, limits: Limits = Limits(), source: str | None = None) -> bytes:
    """The content of the file at ``path``, with the checks and errors of ``load_item(path)``:
    ``InputError`` for a missing, unreadable or directory path, ``ImageTooLargeError`` past
    ``limits.max_file_bytes`` (checked before reading). One open, one fstat and, for a regular file,
    one read of exactly its size (the GIL is released while the kernel copies). ``source`` labels
    errors (default: the path)."""
    p = os.fspath(path)
    return _read_file(p, p if source is None else source, limits)


def _load(item: Item, source: str, index: int, limits: Limits, voi: tuple[int, bool, bool]) -> LoadedImage:
    if isinstance(item, np.ndarray):
        return _load_array(item, source, index, limits)
    if isinstance(item, (str, os.PathLike)):
        data = _read_file(os.fspath(item), source, limits)
        return _load_bytes(data, source, index, limits, voi)
    if isinstance(item, (bytes, bytearray, memoryview)):
        _check_file_bytes(memoryview(item).nbytes, source, limits)  # before copying a large buffer
        data = bytes(item)
        return _load_bytes(data, source, index, limits, voi)
    if _is_dataset(item):
        from cxrkit.io.dicom import load_dicom

        return call_with_deadline(
            lambda: load_dicom(item, source=source, index=index, limits=limits, voi_window_index=voi[0],
                               keep_j2k_frame=voi[1], strict=voi[2]),
            limits.decode_timeout_s, source, "reading the DICOM",
        )
    raise InputError(
        source,
        f"unsupported input type {type(item).__name__}; expected a path, bytes, a numpy array or a pydicom Dataset",
    )


_IS_DIRECTORY = "is a directory, not an image file (use cxrkit.io.iter_sources to expand it)"
_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _read_file(path: "str | bytes", source: str, limits: Limits) -> bytes:
    try:
        fd = os.open(path, _O_READ)
    except FileNotFoundError:
        raise InputError(source, "file not found") from None
    except OSError as exc:  # say what a stat says, as before: access, directory, or read
        try:
            st = os.stat(path)
        except OSError as exc2:
            raise InputError(source, f"cannot access the file: {exc2.strerror or exc2}") from exc2
        if _stat.S_ISDIR(st.st_mode):
            raise InputError(source, _IS_DIRECTORY) from None
        _check_file_bytes(st.st_size, source, limits)
        raise InputError(source, f"cannot read the file: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if _stat.S_ISDIR(st.st_mode):
            raise InputError(source, _IS_DIRECTORY)
        _check_file_bytes(st.st_size, source, limits)
        cap = limits.max_file_bytes + 1  # one byte past the limit tells a file that grew past it
        try:
            data = os.read(fd, min(st.st_size + 1, cap))  # a regular file: all of it in one read
            if len(data) == st.st_size or not data:
                return data
            parts, n = [data], len(data)  # a short read, or a file that grew: read on to EOF or the cap
            while n < cap:
                more = os.read(fd, min(1 << 24, cap - n))
                if not more:
                    break
                parts.append(more)
                n += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise InputError(source, f"cannot read the file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _check_file_bytes(n_bytes: int, source: str, limits: Limits) -> None:
    if n_bytes > limits.max_file_bytes:
        raise ImageTooLargeError(source, f"{n_bytes} bytes exceeds limits.max_file_bytes = {limits.max_file_bytes}")


def _check_pixels(hw: tuple[int, int], source: str, limits: Limits) -> None:
    if hw[0] * hw[1] > limits.max_pixels:
        raise ImageTooLargeError(
            source, f"{hw[0]}x{hw[1]} = {hw[0] * hw[1]} pixels exceeds limits.max_pixels = {limits.max_pixels}"
        )


def _load_bytes(data: bytes, source: str, index: int, limits: Limits, voi: tuple[int, bool, bool]) -> LoadedImage:
    _check_file_bytes(len(data), source, limits)
    fmt = sniff(data, source=source)
    if fmt == "dicom":
        from cxrkit.io.dicom import load_dicom, read_dataset

        def read() -> LoadedImage:
            ds = read_dataset(data, source, limits)
            return load_dicom(ds, source=source, index=index, limits=limits, voi_window_index=voi[0],
                              keep_j2k_frame=voi[1], strict=voi[2])

        return call_with_deadline(read, limits.decode_timeout_s, source, "reading the DICOM")
    hw, meta = (png_header if fmt == "png" else jpeg_header)(data, source=source)
    _check_pixels(hw, source, limits)
    if meta.get("jpeg_scans", 0) > MAX_JPEG_SCANS:
        raise ImageTooLargeError(
            source, f"JPEG with {meta['jpeg_scans']} scans (more than {MAX_JPEG_SCANS}): refused as a scan bomb"
        )
    warnings_: list[str] = []
    orientation = meta.get("exif_orientation")
    if orientation not in (None, 1):
        warnings_.append(
            f"EXIF Orientation {orientation} is recorded, not applied: the image is read, and its boxes are "
            "reported, in the stored pixel order"
        )
    return LoadedImage(
        source=source,
        index=index,
        format=fmt,
        image_size=hw,
        encoded=data,
        pixels=None,
        value_range=header_value_range(meta),
        meta=meta,
        warnings=warnings_,
        limits=limits,
    )


def _load_array(arr: np.ndarray, source: str, index: int, limits: Limits) -> LoadedImage:
    expected = "expected a (h, w) uint8/uint16/float32 array or an (h, w, 3|4) uint8 RGB(A) array"
    if arr.size == 0:
        raise InputError(source, f"empty array (shape {tuple(arr.shape)}); {expected}")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.dtype != np.uint8:
            raise InputError(source, f"colour arrays must be uint8, got {arr.dtype}; {expected}")
        _check_pixels(arr.shape[:2], source, limits)
        pixels = luminance_u8(arr)
        warnings_ = [f"RGB{'A' if arr.shape[-1] == 4 else ''} array converted to gray by luminance"]
        return _array_image(source, index, pixels, (0.0, 255.0), warnings_, limits)
    if arr.ndim != 2:
        raise InputError(source, f"array of shape {tuple(arr.shape)}; {expected}")
    _check_pixels(arr.shape, source, limits)
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size in (1, 2):
        pixels = np.ascontiguousarray(arr, dtype=np.uint8 if size == 1 else np.uint16)  # also fixes byte order
        return _array_image(source, index, pixels, (0.0, 255.0 if size == 1 else 65535.0), [], limits)
    if kind == "f" and size == 4:
        pixels = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(pixels)
        if not finite.all():
            bad = int(pixels.size - np.count_nonzero(finite))
            raise InputError(source, f"float array has {bad} NaN/inf values")
        lo, hi = float(pixels.min()), float(pixels.max())
        if lo >= 0.0 and hi <= 1.0:
            return _array_image(source, index, pixels, (0.0, 1.0), [], limits)
        w = [f"float32 values span [{lo:g}, {hi:g}], outside [0, 1]; normalized by the image min/max"]
        return _array_image(source, index, pixels, (lo, hi if hi > lo else lo + 1.0), w, limits)
    hint = " (use arr.astype(np.float32))" if kind in "fi" else ""
    raise InputError(source, f"unsupported array dtype {arr.dtype}{hint}; {expected}")


def _array_image(
    source: str, index: int, pixels: np.ndarray, vrange: tuple[float, float], w: list[str], limits: Limits
) -> LoadedImage:
    return LoadedImage(
        source=source,
        index=index,
        format="array",
        image_size=(int(pixels.shape[0]), int(pixels.shape[1])),
        encoded=None,
        pixels=pixels,
        value_range=vrange,
        meta={},
        warnings=w,
        limits=limits,
    )


# ---------------------------------------------------------------------------------------------


PathArg = Union[str, "os.PathLike[str]"]


def iter_sources(paths_or_dirs: Union[PathArg, Iterable[PathArg]]) -> Iterator[str]:
    """Yield image file paths: files as given (in the given order), directories expanded
    recursively to the files whose content sniffs as JPEG, PNG or DICOM, sorted by path.

    Hidden files and directories (name starting with '.') inside a directory are skipped, and
    symbolic links to directories are not followed. A path that does not exist is yielded as is,
    so that ``load_item`` reports it.
    """
    if isinstance(paths_or_dirs, (str, os.PathLike)):
        paths_or_dirs = [paths_or_dirs]
    for p in paths_or_dirs:
        path = Path(os.fspath(p))
        if not path.is_dir():
            yield os.fspath(p)
            continue
        found: list[str] = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(os.path.join(root, name) for name in files if not name.startswith("."))
        for full in sorted(found):
            if _is_image_file(full):
                yield full


def _is_image_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        sniff(head)
    except (OSError, UnsupportedFormatError, DecodeError) as exc:
        logger.debug("skipping %s: %s", path, exc)
        return False
    return True
