"""Secondary Capture with the findings burned in, "NOT FOR DIAGNOSTIC USE" in pixels and header.

The radiograph as cxrkit read it (its VOI window, bone bright) becomes an 8-bit RGB image, at most
``max_side`` pixels on its longer side; each positive finding's boxes, peaks and name with score
are drawn in its colour. A black band added above the image says NOT FOR DIAGNOSTIC USE and names
the model; a band below lists the positive findings and the input's warnings. Nothing is drawn
over the anatomy but the boxes and their labels. The header says it too: Burned In Annotation
YES, Image Comments and Series Description, and Source Image Sequence points at the radiograph.
"""

from __future__ import annotations

import datetime
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from cxrkit.dicom.coding import display_name
from cxrkit.dicom.gsps import COLORS_RGB
from cxrkit.results import Prediction

__all__ = ["render_burned_in", "make_sc", "NOT_FOR_DIAGNOSTIC_USE"]

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@lru_cache(maxsize=16)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (FreeType)
    except (TypeError, OSError, ImportError):  # an old Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def render_burned_in(gray_u8: np.ndarray, pred: Prediction, *, model_name: str,
                     warnings_: Sequence[str] = (), max_side: int = 2048, min_side: int = 512) -> np.ndarray:
    """(H', W, 3) uint8 RGB: the overlay image (see the module docstring). The radiograph is
    scaled to at most ``max_side`` and at least ``min_side`` pixels on its longer side (so that
    the text stays legible on a small input)."""
    from PIL import Image, ImageDraw

    h, w = gray_u8.shape
    scale = min(1.0, max_side / max(h, w))
    if max(h, w) * scale < min_side:
        scale = min_side / max(h, w)
    im = Image.fromarray(np.ascontiguousarray(gray_u8))
    if scale != 1.0:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    W, H = im.size
    pad = max(2, W // 200)
    fs = max(10, round(W / 48))  # ~48 characters of text across the image
    while fs > 8 and _font(fs).getlength(NOT_FOR_DIAGNOSTIC_USE) > W - 2 * pad:
        fs -= 1
    font, small = _font(fs), _font(max(8, round(fs * 0.8)))
    positives = [(k, f) for k, f in pred.findings.items() if f.positive]
    keys = list(pred.findings)
    found = ", ".join(f"{display_name(k)} {f.score:.2f}" for k, f in positives) or "no finding above its operating threshold"
    bottom = [f"AI findings: {found}"] + [f"warning: {m}" for m in warnings_]
    bottom = _wrap(bottom, small, W - 2 * pad)
    banner = _wrap([f"{NOT_FOR_DIAGNOSTIC_USE} - cxrkit AI demonstration ({model_name})"], font, W - 2 * pad)
    top_line = fs + pad
    top_h = top_line * len(banner) + pad
    line_h = round(fs * 0.8) + pad
    bot_h = line_h * len(bottom) + pad
    canvas = Image.new("RGB", (W, top_h + H + bot_h), (0, 0, 0))
    canvas.paste(im.convert("RGB"), (0, top_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(banner):
        draw.text((pad, pad + i * top_line), line.strip(), fill=(255, 255, 0), font=font)
    for i, line in enumerate(bottom):
        draw.text((pad, top_h + H + pad + i * line_h), line, fill=(255, 255, 255), font=small)
    width = max(2, round(W / 400))
    for key, f in positives:
        color = COLORS_RGB[keys.index(key) % len(COLORS_RGB)]
        for (x0, y0, x1, y1), (px, py), s in zip(f.boxes_xyxy * scale, f.points_xy * scale, f.box_scores):
            y0, y1, py = y0 + top_h, y1 + top_h, py + top_h
            draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
            r = 2 * width
            draw.ellipse([px - r, py - r, px + r, py + r], outline=color, width=1)
            label = f"{display_name(key)} {float(s):.2f}"
            ty = y0 - fs - 2 if y0 - fs - 2 >= top_h else y0 + 2
            draw.text((x0 + 2, ty), label, fill=color, font=small)
    return np.asarray(canvas)


def _wrap(lines: list[str], font: Any, width: int) -> list[str]:
    out: list[str] = []
    for line in lines:
        words, cur = line.split(" "), ""
        for word in words:
            trial = f"{cur} {word}".strip()
            if cur and font.getlength(trial) > width:
                out.append(cur)
                cur = "  " + word
            else:
                cur = trial
        out.append(cur)
    return out[:40]


def make_sc(rgb: np.ndarray, ref: Any, *, series_uid: str, sop_uid: str, series_number: int,
            model_name: str, software_version: str, now: datetime.datetime | None = None) -> Any:
    """A highdicom ``SCImage`` (RGB, 8 bits) in ``ref``'s Study, derived from ``ref``."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    now = now or datetime.datetime.now()
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # placeholder for highdicom; replaced below
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="cxrkit",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name=model_name[:64] or "cxrkit",
        software_versions=software_version,
        series_description=f"cxrkit AI overlay ({NOT_FOR_DIAGNOSTIC_USE})",
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
    )
    sc.PatientOrientation = ""  # rows/columns gained bands; the source's orientation labels are not claimed
    sc.ConversionType = "WSD"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (f"{NOT_FOR_DIAGNOSTIC_USE}. AI findings of cxrkit {model_name}, a demonstration model that is "
                        "not a medical device; burned-in boxes and text.")
    sc.DerivationDescription = f"cxrkit {model_name} findings burned in; {NOT_FOR_DIAGNOSTIC_USE}"[:1024]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [item]
    return sc
