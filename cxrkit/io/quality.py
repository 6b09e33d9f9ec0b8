"""The header quality gate: is this DICOM a frontal chest radiograph the model is meant to read?

Checked from the header alone (no pixels decoded), so a node or a strict caller refuses an image
before paying for its decode:

| attribute                       | accepted                               | otherwise                         |
|---------------------------------|----------------------------------------|-----------------------------------|
| Modality (0008,0060)            | CR, DX, DR, RG, OT or absent           | MG/IO/PX/XA/RF: warning (refused  |
|                                 |                                        | when strict); others never reach  |
|                                 |                                        | here (``UnsupportedFormatError``) |
| Body Part Examined (0018,0015)  | CHEST, THORAX, LUNG(S), TORSO, absent  | warning (refused when strict)     |
| View Position (0018,5101) and   | PA, AP, absent                         | lateral (LL, RL, LATERAL...):     |
| View Code Sequence (0054,0220)  |                                        | warning (refused when strict)     |
| Photometric Interpretation      | MONOCHROME1, MONOCHROME2               | colour: warning (refused when     |
| (0028,0004)                     |                                        | strict): a photo or screenshot    |
| Pixel Spacing / Imager Pixel    | field of view 100..700 mm (larger      | warning only: a spacing heuristic |
| Spacing                         | side), or no (valid) spacing at all    | must not refuse a real chest      |

A non-DICOM input (JPEG, PNG, array) has no header to check: it passes, strict or not.

``header_issues(ds)`` returns the findings; ``load_item(..., strict=True)`` raises
``UnsuitableImageError`` for the refusing ones, and otherwise every issue's message is in the
item's ``warnings`` (hence ``Prediction.warnings``) and its code in ``meta["header_issues"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cxrkit.errors import UnsuitableImageError

__all__ = ["HeaderIssue", "header_issues", "check_header", "RADIOGRAPH_MODALITIES", "OTHER_XRAY_MODALITIES",
           "LATERAL_VIEWS", "FRONTAL_VIEWS", "CHEST_BODY_PARTS", "FIELD_OF_VIEW_MM"]

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT", ""})
OTHER_XRAY_MODALITIES = frozenset({"MG", "IO", "PX", "XA", "RF"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLAT", "RLAT"})  # not RLD/LLD: decubitus views are frontal
FRONTAL_VIEWS = frozenset({"PA", "AP", ""})
CHEST_BODY_PARTS = frozenset({"", "CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LAT", "TORSO"})
#: the larger side of a chest radiograph's field of view, in mm (neonate .. large adult, generous)
FIELD_OF_VIEW_MM = (100.0, 700.0)
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# View Code Sequence (CID 4010 "DX View") values of lateral projections: SNOMED CT right lateral and
# left lateral (as in pydicom's code dictionary); any Code Meaning saying "lateral" (but not
# "decubitus", a frontal projection of a patient lying on one side) counts too
_LATERAL_VIEW_CODES = frozenset({"399198007", "399173006"})


@dataclass(frozen=True)
class HeaderIssue:
    """One finding of the gate. ``code``: a stable identifier (``lateral_view``, ``non_chest_body_part``,
    ``non_radiograph_modality``, ``colour_image``, ``implausible_field_of_view``); ``refuse``: whether
    ``strict`` refuses the image for it; ``message``: what was found and what was expected."""

    code: str
    attribute: str
    value: str
    message: str
    refuse: bool


def _view(ds: Any) -> Any:
    from cxrkit.io.dicom import _frame0_view  # enhanced objects: frame-0 functional groups

    return _frame0_view(ds)


def header_issues(ds: Any) -> list[HeaderIssue]:
    """The gate's findings for a pydicom Dataset (header only; nothing is decoded)."""
    view = _view(ds)
    issues: list[HeaderIssue] = []
    modality = str(ds.get("Modality") or "").upper()
    if modality not in RADIOGRAPH_MODALITIES:
        issues.append(HeaderIssue(
            "non_radiograph_modality", "Modality", modality,
            f"modality {modality} is not a chest radiograph modality (CR/DX); read anyway", True))
    body_part = str(view.get("BodyPartExamined") or "").strip().upper()
    if body_part not in CHEST_BODY_PARTS:
        issues.append(HeaderIssue(
            "non_chest_body_part", "BodyPartExamined", body_part,
            f"BodyPartExamined is {body_part}, not CHEST: the model reads chest radiographs only", True))
    vp = str(view.get("ViewPosition") or "").strip().upper()
    lateral_code = _lateral_view_code(view)
    if vp in LATERAL_VIEWS or (vp == "" and lateral_code):
        shown = vp or lateral_code
        issues.append(HeaderIssue(
            "lateral_view", "ViewPosition", shown,
            f"lateral view (ViewPosition {shown}); the model expects frontal PA/AP images", True))
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if photometric not in _MONOCHROME:
        issues.append(HeaderIssue(
            "colour_image", "PhotometricInterpretation", photometric,
            f"colour DICOM ({photometric}) converted to gray by luminance; a radiograph is MONOCHROME1/2 "
            "(a colour image is usually a photo or a screen capture)", True))
    fov = _field_of_view_mm(ds, view)
    if fov is not None and not FIELD_OF_VIEW_MM[0] <= max(fov) <= FIELD_OF_VIEW_MM[1]:
        issues.append(HeaderIssue(
            "implausible_field_of_view", "PixelSpacing", f"{fov[0]:.0f}x{fov[1]:.0f} mm",
            f"field of view {fov[0]:.0f} x {fov[1]:.0f} mm (Rows/Columns x pixel spacing) is not that of a chest "
            f"radiograph (larger side {FIELD_OF_VIEW_MM[0]:g}-{FIELD_OF_VIEW_MM[1]:g} mm); check the image and "
            "its spacing", False))
    return issues


def check_header(ds: Any, source: str, *, strict: bool = False) -> list[HeaderIssue]:
    """``header_issues``, raising ``UnsuitableImageError`` (naming ``source``) when ``strict`` and
    any issue refuses the image."""
    issues = header_issues(ds)
    refused = [i for i in issues if i.refuse]
    if strict and refused:
        what = "; ".join(i.message.split(";")[0] for i in refused)
        raise UnsuitableImageError(
            source, f"refused by the header quality gate (strict=True): {what}. Send a frontal (PA/AP) chest "
            "CR/DX image, or read it with strict=False to get a result with these warnings")
    return issues


def _lateral_view_code(view: Any) -> str:
    for item in view.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue") or "")
        meaning = str(item.get("CodeMeaning") or "").lower()
        if code in _LATERAL_VIEW_CODES or ("lateral" in meaning and "decubitus" not in meaning):
            return str(item.get("CodeMeaning") or code)
    return ""


def _field_of_view_mm(ds: Any, view: Any) -> tuple[float, float] | None:
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            sy, sx = (float(v) for v in view.get(kw) or ())
        except (TypeError, ValueError):
            continue
        if sy > 0 and sx > 0 and rows > 0 and cols > 0 and sy < 1e3 and sx < 1e3:
            return rows * sy, cols * sx
    return None
