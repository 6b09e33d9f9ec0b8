"""Grayscale Softcopy Presentation State (highdicom) drawing a Prediction on its source image.

One graphic layer per positive finding (named after the finding, described by its display name
and score, with its recommended colour), holding each box as a closed POLYLINE, its peak as a
POINT and a text label; one more layer, ``CXRKIT_NOTICE``, states that this is an AI
demonstration not for diagnostic use, and lists the input's warnings (a lateral view...). A
viewer shows or hides each layer on its own. The source's own grayscale rendering is kept: its
Modality/VOI LUT attributes are copied, and the presentation LUT is INVERSE for MONOCHROME1 (or an
INVERSE Presentation LUT Shape), so the radiograph looks as it does without the presentation state.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Sequence

import numpy as np

from cxrkit.dicom.coding import display_name
from cxrkit.dicom.sr import box_polyline
from cxrkit.results import Prediction

__all__ = ["make_gsps", "layer_names", "COLORS_RGB"]

COLORS_RGB = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
              (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]
NOTICE = "cxrkit AI demonstration - NOT FOR DIAGNOSTIC USE"


def layer_names(keys: Sequence[str]) -> dict[str, str]:
    """A distinct Code String layer name (<= 16 of A-Z 0-9 _ and space, starting with a letter)
    for each finding key."""
    out: dict[str, str] = {}
    used = {"CXRKIT_NOTICE"}
    for i, key in enumerate(keys):
        # highdicom: no leading digit, space or underscore
        base = re.sub(r"[^A-Z0-9_ ]", "_", key.upper()).lstrip("_ 0123456789").strip() or f"FINDING_{i}"
        name = base[:16]
        n = 1
        while name in used:
            suffix = f"_{n}"
            name = base[: 16 - len(suffix)] + suffix
            n += 1
        used.add(name)
        out[key] = name
    return out


def _lo(text: str) -> str:
    return " ".join(text.replace("\\", "/").split())[:64]


def make_gsps(pred: Prediction, ref: Any, *, series_uid: str, sop_uid: str, series_number: int,
              model_name: str, software_version: str, warnings_: Sequence[str] = (),
              now: datetime.datetime | None = None) -> Any:
    """A highdicom ``GrayscaleSoftcopyPresentationState`` for ``pred`` on the image ``ref``."""
    import highdicom as hd
    from highdicom.color import CIELabColor

    from cxrkit.io.lut import should_invert

    now = now or datetime.datetime.now()
    rows, cols = int(ref.Rows), int(ref.Columns)
    positives = [k for k, f in pred.findings.items() if f.positive]
    names = layer_names(positives)
    layers: list[Any] = []
    annotations: list[Any] = []
    all_keys = list(pred.findings)
    for order, key in enumerate(positives, start=1):
        f = pred.findings[key]
        rgb = COLORS_RGB[all_keys.index(key) % len(COLORS_RGB)]
        layer = hd.pr.GraphicLayer(layer_name=names[key], order=order,
                                   description=_lo(f"{display_name(key)} (score {f.score:.2f})"),
                                   display_color=CIELabColor.from_rgb(*rgb))
        layers.append(layer)
        graphics, texts = [], []
        for box, pt, s in zip(f.boxes_xyxy, f.points_xy, f.box_scores):
            poly = box_polyline(box, rows, cols)
            graphics.append(hd.pr.GraphicObject(graphic_type="POLYLINE", graphic_data=poly, units="PIXEL"))
            px = np.array([[min(max(float(pt[0]), 0.0), cols), min(max(float(pt[1]), 0.0), rows)]], np.float32)
            graphics.append(hd.pr.GraphicObject(graphic_type="POINT", graphic_data=px, units="PIXEL"))
            x0, y0 = float(poly[0, 0]), float(poly[0, 1])
            texts.append(hd.pr.TextObject(text_value=_lo(f"{display_name(key)} {float(s):.2f}"), units="PIXEL",
                                          anchor_point=(x0, y0), anchor_point_visible=False))
        if not graphics:  # a positive finding without a box (a global one): its name in the corner
            texts.append(hd.pr.TextObject(text_value=_lo(f"{display_name(key)} {f.score:.2f} (no box)"),
                                          units="DISPLAY", bounding_box=(0.01, 0.06 + 0.03 * order, 0.6,
                                                                         0.09 + 0.03 * order),
                                          text_justification="LEFT"))
        annotations.append(hd.pr.GraphicAnnotation(referenced_images=[ref], graphic_layer=layer,
                                                   graphic_objects=graphics or None, text_objects=texts))
    notice = hd.pr.GraphicLayer(layer_name="CXRKIT_NOTICE", order=len(layers) + 1,
                                description="AI notice and input warnings", display_color=CIELabColor.from_rgb(255, 255, 255))
    lines = [NOTICE] + (["no finding above its operating threshold"] if not positives else []) + list(warnings_)
    texts = [hd.pr.TextObject(text_value=line[:64 * 16], units="DISPLAY",
                              bounding_box=(0.01, 0.01 + 0.03 * i, 0.99, 0.04 + 0.03 * i), text_justification="LEFT")
             for i, line in enumerate(lines[:20])]
    annotations.append(hd.pr.GraphicAnnotation(referenced_images=[ref], graphic_layer=notice, text_objects=texts))
    layers.append(notice)
    invert, _ = should_invert(str(ref.get("PhotometricInterpretation") or "MONOCHROME2").upper(),
                              ref.get("PresentationLUTShape"))
    plut = hd.PresentationLUTTransformation(
        presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE if invert else hd.PresentationLUTShapeValues.IDENTITY)
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[ref],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="cxrkit",
        manufacturer_model_name=model_name[:64] or "cxrkit",
        software_versions=software_version,
        device_serial_number="CXRKIT",
        content_label="CXRKIT_FINDINGS",
        content_description=_lo(f"cxrkit {model_name} findings - NOT FOR DIAGNOSTIC USE"),
        graphic_annotations=annotations,
        graphic_layers=layers,
        presentation_lut_transformation=plut,
        series_description="cxrkit AI overlay (NOT FOR DIAGNOSTIC USE)",
        series_date=now.date(),
        series_time=now.time(),
    )
