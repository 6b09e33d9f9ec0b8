"""Comprehensive SR, TID 1500 Measurement Report (highdicom), from a Prediction.

Content tree:

- Measurement Report (TID 1500), procedure reported: Plain radiography, observer: the cxrkit device
  (name, model, version);
- per finding the model assesses (not those its card disables: "absent" would claim an
  assessment that was never made), a Measurement and Qualitative Evaluation Group (TID 1501) on the
  source image: finding type = the finding's code (SNOMED CT or 99CXRKIT), a qualitative
  evaluation ``<finding> = Present | Absent`` at the card's operating threshold (``Indeterminate``
  when a score over the threshold was not reported positive: a finding the model card disables),
  and the measurements ``Probability`` (DCM 122157, the image-level score) and ``Operating
  threshold`` (99CXRKIT), with the algorithm's name and version;
- per box of a positive finding, two Planar ROI groups (TID 1410) sharing one Tracking UID (one
  lesion): the box as a closed POLYLINE and its peak as a POINT (SCOORD, image pixels, origin
  at the top left corner of the top left pixel), each with the box's Probability;
- header quality-gate findings (a lateral view, ...) as qualitative evaluations of a group whose
  finding type is ``99CXRKIT INPUT-QC``.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any, Sequence

import numpy as np

from cxrkit.dicom.coding import (
    ABSENT, INDETERMINATE, NO_UNITS, PLAIN_RADIOGRAPHY, PRESENT, PROBABILITY, coded, coding_scheme_item,
    finding_code, private,
)
from cxrkit.errors import InputError
from cxrkit.results import Prediction

__all__ = ["make_sr", "box_polyline", "QC_MEANINGS"]

# header quality-gate codes -> Code Meaning (LO, <= 64 characters)
QC_MEANINGS = {
    "lateral_view": "Lateral view: model expects frontal PA/AP",
    "non_chest_body_part": "Body part examined is not the chest",
    "non_radiograph_modality": "Modality is not CR/DX",
    "colour_image": "Colour image, not a radiograph",
    "implausible_field_of_view": "Field of view not that of a chest radiograph",
}


def box_polyline(box_xyxy: Sequence[float], rows: int, cols: int) -> np.ndarray:
    """A closed 5-point polyline (column, row) of a box, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    x0, x1 = np.clip([x0, x1], 0.0, float(cols))
    y0, y1 = np.clip([y0, y1], 0.0, float(rows))
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _point(p_xy: Sequence[float], rows: int, cols: int) -> np.ndarray:
    return np.array([[float(np.clip(p_xy[0], 0.0, cols)), float(np.clip(p_xy[1], 0.0, rows))]], dtype=np.float32)


def _image_library(ref: Any) -> Any:
    """TID 1600 Image Library with the source image. highdicom's projection radiography
    descriptors (TID 1603) need Patient Orientation and Imager Pixel Spacing, which many CR/DX
    images lack; all TID 1603 rows are optional, so the entry carries those the source has."""
    import highdicom as hd
    from highdicom.sr.value_types import NumContentItem, TextContentItem
    from pydicom.sr.codedict import codes

    orientation = [str(v) for v in (ref.get("PatientOrientation") or [])]
    spacing = ref.get("ImagerPixelSpacing")
    try:
        spacing = [float(v) for v in spacing] if spacing is not None else None
    except (TypeError, ValueError):
        spacing = None
    if len(orientation) == 2 and all(orientation) and spacing and len(spacing) == 2:
        return hd.sr.ImageLibrary([ref])
    view = copy.copy(ref)
    view.Modality = "OT"  # only steers highdicom past TID 1603; the coded modality comes from the SOP Class
    library = hd.sr.ImageLibrary([view])
    extra: list[Any] = []
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    if len(orientation) == 2 and all(orientation):
        extra += [TextContentItem(name=codes.DCM.PatientOrientationRow, value=orientation[0], relationship_type=acq),
                  TextContentItem(name=codes.DCM.PatientOrientationColumn, value=orientation[1], relationship_type=acq)]
    if spacing and len(spacing) == 2 and min(spacing) > 0:
        extra += [NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=spacing[1], unit=codes.UCUM.Millimeter,
                                 relationship_type=acq),
                  NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=spacing[0], unit=codes.UCUM.Millimeter,
                                 relationship_type=acq)]
    if extra:
        for group in library[0].ContentSequence:
            for item in group.ContentSequence:
                if item.ValueType == "IMAGE":
                    item.ContentSequence.extend(extra)
    return library


def make_sr(pred: Prediction, ref: Any, *, series_uid: str, sop_uid: str, series_number: int,
            model_name: str, model_version: str, software_version: str, device_uid: str,
            header_issues: Sequence[str] = (), not_assessed: "frozenset[str] | set[str]" = frozenset(),
            now: datetime.datetime | None = None) -> Any:
    """A Comprehensive SR (pydicom Dataset, built by highdicom) for ``pred`` on the image whose
    header is ``ref``. Findings in ``not_assessed`` (those the model card disables) get no group:
    the model does not assess them, and "absent" would claim it had."""
    import highdicom as hd
    from pydicom.dataset import Dataset, FileDataset
    from pydicom.sr.codedict import codes

    now = now or datetime.datetime.now()
    rows, cols = int(ref.Rows), int(ref.Columns)
    algo = hd.sr.AlgorithmIdentification(name=f"cxrkit {model_name}"[:64], version=model_version[:64] or "0")
    unit = coded(NO_UNITS)
    present, absent, indeterminate = coded(PRESENT), coded(ABSENT), coded(INDETERMINATE)
    prob = coded(PROBABILITY)
    threshold_name = private("THRESHOLD", "Operating threshold")
    groups: list[Any] = []
    for key, f in pred.findings.items():
        if key in not_assessed and not f.positive:
            continue
        code = finding_code(key).coded()
        if f.positive:
            value = present
        elif f.score >= f.threshold:  # over the threshold but not reported: the card disables it
            value = indeterminate
        else:
            value = absent
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{key}"[:64]),
            finding_type=code,
            algorithm_id=algo,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
            measurements=[
                hd.sr.Measurement(name=prob, value=float(f.score), unit=unit),
                hd.sr.Measurement(name=threshold_name, value=float(f.threshold), unit=unit),
            ],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=code, value=value)],
        ))
    for key, f in pred.findings.items():
        if not f.positive:
            continue
        code = finding_code(key).coded()
        for j, (box, pt, s) in enumerate(zip(f.boxes_xyxy, f.points_xy, f.box_scores)):
            lesion_uid = hd.UID()
            for kind, gtype, data in (("box", hd.sr.GraphicTypeValues.POLYLINE, box_polyline(box, rows, cols)),
                                      ("peak", hd.sr.GraphicTypeValues.POINT, _point(pt, rows, cols))):
                region = hd.sr.ImageRegion(graphic_type=gtype, graphic_data=data,
                                           source_image=hd.sr.SourceImageForRegion.from_source_image(ref))
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=lesion_uid,
                                                                  identifier=f"{key} region {j + 1} {kind}"[:64]),
                    referenced_region=region,
                    finding_type=code,
                    algorithm_id=algo,
                    measurements=[hd.sr.Measurement(name=prob, value=float(s), unit=unit)],
                ))
    if header_issues:
        qc_code = private("INPUT-QC", "Input image quality check")
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="input quality"),
            finding_type=qc_code,
            algorithm_id=algo,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=qc_code, value=private(c.upper().replace("_", "-")[:16],
                                                                        QC_MEANINGS.get(c, c)[:64]))
                for c in header_issues
            ],
        ))
    if not groups:
        raise InputError(pred.source, "the Prediction has no findings: there is nothing for a structured report to say")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="cxrkit", manufacturer_name="cxrkit", model_name=model_name[:64] or "cxrkit"),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=coded(PLAIN_RADIOGRAPHY),
        imaging_measurements=groups,
    )
    root = report[0].ContentSequence
    root.insert(len(root) - 1, _image_library(ref)[0])  # TID 1600, just before Imaging Measurements
    # highdicom's SR constructor deep-copies and re-parses the whole content tree and searches it
    # for references (~1.4 s for 29 findings and 20 regions on a 2-core CPU; measured): it gets the
    # root container alone, and the tree (built and checked by highdicom's templates above) is
    # attached after. The only image the tree references is ``ref``, which is the evidence.
    root = report[0]
    shell = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            shell.add(elem)
    shell.ContentSequence = [root.ContentSequence[0]]  # the language item: a tree of one leaf
    sr = hd.sr.ComprehensiveSR(
        evidence=[ref],
        content=shell,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="cxrkit",
        manufacturer_model_name=model_name[:64] or "cxrkit",
        software_versions=software_version,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="cxrkit AI findings (NOT FOR DIAGNOSTIC USE)",
        coding_schemes=[coding_scheme_item()],
        content_qualification="RESEARCH",
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
    )
    sr.ContentSequence = root.ContentSequence
    # a plain Dataset (no stale highdicom content view), encoded as its file meta says
    out = FileDataset(None, {}, file_meta=sr.file_meta, preamble=b"\0" * 128, is_implicit_VR=False,
                      is_little_endian=True)
    out.update(sr)
    return out
