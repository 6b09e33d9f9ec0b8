"""Inputs: sniff formats, read JPEG/PNG headers, read DICOM (LUTs, MONOCHROME1), accept arrays.

Public contract (used by preprocessing and the Detector)::

    load_item(item, index, *, limits=Limits(), voi_window_index=0) -> LoadedImage
    decode_pixels(img) -> LoadedImage        # JPEG/PNG bytes -> gray pixels (Pillow)
    sniff(data) -> "jpeg" | "png" | "dicom"  # from content, never the file name
    iter_sources(paths_or_dirs) -> Iterator[str]
    encapsulated_frame(ds) -> (bytes, transfer_syntax_uid)

Every failure on an item is an ``InputError`` subclass whose message names the item. pydicom is
imported only when a DICOM is read.
"""

from __future__ import annotations

from typing import Any

from cxrkit.io.image import LoadedImage, decode_pixels
from cxrkit.io.sniff import sniff
from cxrkit.io.sources import describe_item, iter_sources, load_item

__all__ = [
    "LoadedImage",
    "load_item",
    "decode_pixels",
    "sniff",
    "iter_sources",
    "describe_item",
    "encapsulated_frame",
]


def encapsulated_frame(ds: Any, index: int = 0) -> tuple[bytes, str]:
    """The encapsulated bytes of frame ``index`` (JPEG / JPEG 2000 / JPEG-LS / RLE) of a pydicom
    Dataset and its transfer syntax UID, e.g. to hand JPEG 2000 to nvJPEG2000."""
    from cxrkit.io.dicom import encapsulated_frame as _impl

    return _impl(ds, index)
