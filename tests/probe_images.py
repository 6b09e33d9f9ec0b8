"""Images for the geometry probe model (cxrkit/models/cxr-probe): flat squares on a dark background.

Finding k of the probe fires on heatmap cells whose pixels all lie within +-0.03 of unit intensity
0.25 + 0.1 k; the background (0.05) lies in no band.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

PROBE_LEVELS = (0.25, 0.35, 0.45, 0.55, 0.65, 0.75)
PROBE_LABELS = ("nodule", "mass", "consolidation", "pleural_effusion", "pneumothorax", "cardiomegaly")
BACKGROUND = 0.05


@dataclass(frozen=True)
class Square:
    k: int  # finding index
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int

    @property
    def key(self) -> str:
        return PROBE_LABELS[self.k]


def random_squares(rng: np.random.Generator, h: int, w: int, n: int, min_side: int) -> list[Square]:
    """n non-overlapping squares (with a gap of min_side/2), each of a different finding."""
    out: list[Square] = []
    ks = rng.permutation(len(PROBE_LEVELS))[:n]
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 10_000:
            raise RuntimeError("could not place squares")
        side = int(rng.integers(min_side, max(min_side + 1, min(h, w) // 3)))
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        gap = min_side // 2
        if any(x0 < s.x1 + gap and s.x0 < x0 + side + gap and y0 < s.y1 + gap and s.y0 < y0 + side + gap for s in out):
            continue
        out.append(Square(int(ks[len(out)]), x0, y0, x0 + side, y0 + side))
    return out


def render(h: int, w: int, squares: list[Square]) -> np.ndarray:
    """(h, w) float64 unit-intensity image."""
    img = np.full((h, w), BACKGROUND)
    for s in squares:
        img[s.y0:s.y1, s.x0:s.x1] = PROBE_LEVELS[s.k]
    return img


def encode(unit: np.ndarray, fmt: str):
    """The image in one input format: 'jpeg', 'png8', 'png16', 'u8', 'u16', 'f32', 'dicom', 'dicom-j2k'."""
    from PIL import Image

    if fmt == "u8":
        return np.round(unit * 255).astype(np.uint8)
    if fmt == "u16":
        return np.round(unit * 65535).astype(np.uint16)
    if fmt == "f32":
        return unit.astype(np.float32)
    if fmt in ("jpeg", "png8"):
        b = io.BytesIO()
        im = Image.fromarray(np.round(unit * 255).astype(np.uint8))
        im.save(b, format="JPEG", quality=95) if fmt == "jpeg" else im.save(b, format="PNG")
        return b.getvalue()
    if fmt == "png16":
        b = io.BytesIO()
        Image.fromarray(np.round(unit * 65535).astype(np.uint16)).save(b, format="PNG")
        return b.getvalue()
    if fmt in ("dicom", "dicom-j2k"):
        return _dicom(unit, j2k=fmt == "dicom-j2k")
    raise ValueError(fmt)


def _dicom(unit: np.ndarray, j2k: bool) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    px = np.round(unit * 4095).astype(np.uint16)  # 12-bit CR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "PROBE"
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.15, 0.15]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = px.tobytes()
    if j2k:
        ds.compress(JPEG2000Lossless, px)
    b = io.BytesIO()
    ds.save_as(b, enforce_file_format=True)
    return b.getvalue()


# The probe's finding k fires on flat squares of unit intensity 0.25 + 0.1 k (cxrkit/nets/probe.py).
PROBE_LEVELS_U8 = [round((0.25 + 0.1 * k) * 255) for k in range(6)]


def probe_image(h: int, w: int, levels: list[int], seed: int) -> np.ndarray:
    """Dark background, one bright flat square per level, 1/4 of the short side wide."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.uint8)
    side = min(h, w) // 4
    for j, lv in enumerate(levels):
        y = int(rng.integers(0, h - side))
        x = (j * (w - side)) // max(1, len(levels) - 1) if len(levels) > 1 else int(rng.integers(0, w - side))
        img[y:y + side, x:x + side] = lv
    return img


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def strip_timings(d: dict) -> dict:
    d = dict(d)
    d.pop("timings_ms", None)
    return d
