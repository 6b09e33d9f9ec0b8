"""DICOM outputs (SR TID 1500, GSPS, burned-in SC): valid by dciodvfy, readable by pydicom and
highdicom, in the right Study / Series with the right references, for real DICOM sources of
several kinds and for PNG / JPEG / array inputs.

Scores of cxr29-demo are not relied on (the model is being retrained): structure is checked on
its real predictions, content on hand-made Predictions."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

import cxrkit  # noqa: E402
from cxrkit.dicom import StudyInfo, make_outputs  # noqa: E402
from cxrkit.dicom.coding import PRIVATE_SCHEME, finding_code, private_code  # noqa: E402
from cxrkit.dicom.gsps import layer_names  # noqa: E402
from cxrkit.errors import InputError  # noqa: E402
from cxrkit.models import load_model_package  # noqa: E402
from cxrkit.results import Finding, Prediction  # noqa: E402
from dicom_helpers import assert_dciodvfy_clean, require_tool  # noqa: E402
from test_fuzz_headers import make_dx  # noqa: E402

SOURCES = {
    "cr-jpeg-baseline": "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "cr-monochrome1": "torchxrayvision/Fake_MONOHR1.dcm",
    "dx-monochrome1-inverse": "dicom/dx-tiny-monochrome1.dcm",
    "cr-jpeg-ls-15bit": "dicom/nema-rg1/RG1_JLSN.dcm",
    "dx-j2k-12bit": "dicom/chest-dx-966-j2k.dcm",
    "png-8bit": "torchxrayvision/00000001_000.png",
    "jpeg": "torchxrayvision/16747_3_1.jpg",
}


@pytest.fixture(scope="module")
def predicted(shared_data: Path):
    """(source path, Prediction) for every source, from one Detector call."""
    paths = [str(shared_data / rel) for rel in SOURCES.values()]  # (the slow one only costs its decode)
    with cxrkit.Detector.from_pretrained("cxr29-demo") as det:
        preds = det.predict(paths)
    for p in preds:
        assert p.error is None, (p.source, p.error)
    return dict(zip(SOURCES, zip(paths, preds)))


def _ref_uids(seq) -> set[str]:
    """Every Referenced SOP Instance UID under a (study / series / instance) reference sequence."""
    out = set()
    for item in seq:
        if "ReferencedSOPInstanceUID" in item:
            out.add(str(item.ReferencedSOPInstanceUID))
        for elem in item:
            if elem.VR == "SQ":
                out |= _ref_uids(elem.value)
    return out


@pytest.mark.parametrize("kind", [k if k != "cr-jpeg-ls-15bit" else pytest.param(k, marks=pytest.mark.slow)
                                  for k in SOURCES])
def test_outputs_valid_and_in_the_source_study(kind: str, predicted, tmp_path: Path) -> None:
    require_tool("dciodvfy")
    path, pred = predicted[kind]
    outs = make_outputs(pred, path)
    files = outs.save(tmp_path)
    assert len(files) == (3 if path.endswith(".dcm") else 4)
    for f in files:
        assert_dciodvfy_clean(f)
    back = {f: pydicom.dcmread(f) for f in files}
    if path.endswith(".dcm"):
        src = pydicom.dcmread(path, stop_before_pixels=True)
        assert outs.source is None
    else:  # a new Study, opened by an SC of the input image, which the others reference
        src = outs.source
        assert src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and src.Modality == "OT"
        assert (src.Rows, src.Columns) == tuple(pred.image_size)
    today = datetime.date.today().strftime("%Y%m%d")
    series = {str(src.SeriesInstanceUID)}
    sops = {str(src.SOPInstanceUID)}
    for ds in (outs.sr, outs.gsps, outs.sc):
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        for kw in ("PatientID", "StudyDate", "AccessionNumber", "PatientName"):
            if str(ds.get(kw) or "") != str(src.get(kw) or ""):  # only a value invalid for its VR is left out
                assert not ds.get(kw) and any(kw in w for w in outs.warnings), (kw, ds.get(kw), src.get(kw))
        assert str(ds.SeriesDate) == today
        assert str(ds.SeriesInstanceUID) not in series and str(ds.SOPInstanceUID) not in sops
        series.add(str(ds.SeriesInstanceUID))
        sops.add(str(ds.SOPInstanceUID))
    src_uid = str(src.SOPInstanceUID)
    # SR: TID 1500, evidence and every image reference -> the source
    sr = outs.sr
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert _ref_uids(sr.CurrentRequestedProcedureEvidenceSequence) == {src_uid}
    doc = hd.sr.srread([f for f in files if back[f].Modality == "SR"][0])
    groups = doc.content.get_image_measurement_groups()
    card = load_model_package("cxr29-demo").card  # findings the card disables are not assessed: no group
    assessed = [k for k, on in zip(card.labels, card.enabled) if on]
    assert [g.finding_type.meaning for g in groups] == [finding_code(k).meaning for k in pred.findings if k in assessed]
    for g in groups:
        assert g.source_images[0].referenced_sop_instance_uid == src_uid
    n_boxes = sum(len(f.boxes_xyxy) for f in pred.findings.values() if f.positive)
    rois = doc.content.get_planar_roi_measurement_groups()
    assert len(rois) == 2 * n_boxes  # a POLYLINE box and a POINT peak per box
    for g in rois:
        assert g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src_uid
    # GSPS: references the source, one layer per positive finding plus the notice
    pr = outs.gsps
    assert _ref_uids(pr.ReferencedSeriesSequence) == {src_uid}
    positives = pred.positive_findings
    assert [lay.GraphicLayer for lay in pr.GraphicLayerSequence] == list(layer_names(positives).values()) + ["CXRKIT_NOTICE"]
    invert = src.get("PhotometricInterpretation") == "MONOCHROME1" or src.get("PresentationLUTShape") == "INVERSE"
    assert pr.PresentationLUTShape == ("INVERSE" if invert else "IDENTITY")
    # SC: derived from the source, burned in, says so
    sc = outs.sc
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src_uid
    assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    img = hd.imread([f for f in files if back[f].SOPInstanceUID == sc.SOPInstanceUID][0])
    assert img.get_frame(1).shape[-1] == 3


def _pred(size: tuple[int, int], **findings: Finding) -> Prediction:
    # a model with no card: every finding counts as assessed
    return Prediction(source="synthetic", index=0, findings=findings, image_size=size, model="hand-made")


def _f(key: str, score: float, positive: bool, thr: float = 0.5, boxes=()) -> Finding:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    pts = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1) if len(boxes) else np.zeros((0, 2))
    return Finding(key=key, score=score, positive=positive, threshold=thr, boxes_xyxy=boxes,
                   box_scores=np.full(len(boxes), score, np.float32), points_xy=pts)


def test_codes_private_scheme_and_labels_outside_the_ontology(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    data = make_dx(np.full((300, 400), 1000, np.uint16), BodyPartExamined="CHEST", ViewPosition="PA",
                   StudyInstanceUID=pydicom.uid.generate_uid(), SeriesInstanceUID=pydicom.uid.generate_uid(),
                   PatientID="P1", PatientName="Doe^Jane")
    long_key = "a_label_longer_than_sixteen_characters"
    pred = _pred((300, 400),
                 nodule=_f("nodule", 0.9, True, boxes=[[10, 20, 60, 80], [390, 290, 420, 330]]),  # 2nd box off the edge
                 mass=_f("mass", 0.7, True, boxes=[[100, 100, 200, 180]]),
                 pleural_effusion=_f("pleural_effusion", 0.1, False),
                 cardiomegaly=_f("cardiomegaly", 0.8, True),  # positive, no box
                 tuberculosis=_f("tuberculosis", 0.9, False),  # over threshold, not reported: disabled
                 **{"épanchement": _f("épanchement", 0.6, True, boxes=[[5, 5, 50, 50]]),
                    long_key: _f(long_key, 0.2, False)})
    outs = make_outputs(pred, data)
    for f in outs.save(tmp_path):
        assert_dciodvfy_clean(f)
    sr = outs.sr
    assert sr.SpecificCharacterSet == "ISO_IR 192"  # a label that is not ASCII
    schemes = {i.CodingSchemeDesignator: i for i in sr.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in schemes and schemes[PRIVATE_SCHEME].CodingSchemeName
    doc = hd.sr.ComprehensiveSR.from_dataset(sr)
    groups = {g.tracking_identifier: g for g in doc.content.get_image_measurement_groups()}
    nod, mass = groups["nodule"], groups["mass"]
    assert (nod.finding_type.value, nod.finding_type.scheme_designator) == ("427359005", "SCT")
    assert (mass.finding_type.value, mass.finding_type.scheme_designator) == ("mass", PRIVATE_SCHEME)
    ep = groups["épanchement"].finding_type
    assert ep.scheme_designator == PRIVATE_SCHEME and ep.meaning == "Épanchement"
    assert groups[long_key].finding_type.value == private_code(long_key) and len(private_code(long_key)) <= 16
    value = {k: g.get_qualitative_evaluations()[0].value.meaning for k, g in groups.items()}
    assert value["nodule"] == "Present" and value["pleural_effusion"] == "Absent"
    assert value["tuberculosis"] == "Indeterminate"  # over its threshold, yet not reported positive
    prob = {k: g.get_measurements()[0].value for k, g in groups.items()}
    assert prob["nodule"] == pytest.approx(0.9) and prob["pleural_effusion"] == pytest.approx(0.1)
    rois = doc.content.get_planar_roi_measurement_groups()
    assert len(rois) == 2 * 4  # nodule 2, mass 1, épanchement 1; box + peak each
    polys = [np.asarray(g.roi.value) for g in rois if g.roi.graphic_type.value == "POLYLINE"]
    assert all(p.shape == (5, 2) and (p[0] == p[-1]).all() for p in polys)
    assert max(float(p[:, 0].max()) for p in polys) <= 400 and max(float(p[:, 1].max()) for p in polys) <= 300
    layers = [lay.GraphicLayer for lay in outs.gsps.GraphicLayerSequence]
    assert layers == ["NODULE", "MASS", "CARDIOMEGALY", "PANCHEMENT", "CXRKIT_NOTICE"]


def test_layer_names_are_distinct_code_strings() -> None:
    names = layer_names(["pleural_effusion_left", "pleural_effusion_right", "a-b", "", "x" * 40, "x" * 41, "3d", "_x"])
    assert len(set(names.values())) == 8
    assert all(len(n) <= 16 and n[0].isalpha() and all(c.isupper() or c.isdigit() or c in "_ " for c in n)
               for n in names.values())


def test_non_dicom_input_gets_a_new_study_with_callers_identifiers(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    arr = (np.arange(200 * 240, dtype=np.uint32).reshape(200, 240) % 65536).astype(np.uint16)
    with cxrkit.Detector.from_pretrained("cxr29-demo") as det:
        pred = det.predict([arr])[0]
    info = StudyInfo(patient_id="MRN-42", patient_name="Doe^John", patient_sex="M", accession_number="ACC123",
                     study_id="S7", study_instance_uid="1.2.3.4.5.6.7", study_date="20240102", study_time="101500",
                     study_description="chest screening")
    outs = make_outputs(pred, arr, study=info, uid_prefix="1.2.3.999.")
    for f in outs.save(tmp_path):
        assert_dciodvfy_clean(f)
    for ds in outs.datasets():
        assert (ds.PatientID, ds.AccessionNumber, ds.StudyID) == ("MRN-42", "ACC123", "S7")
        assert (ds.StudyInstanceUID, str(ds.StudyDate), str(ds.StudyTime)) == ("1.2.3.4.5.6.7", "20240102", "101500")
        assert str(ds.PatientName) == "Doe^John" and ds.SOPInstanceUID.startswith("1.2.3.999.")
    src = outs.source
    assert src.BitsStored == 16 and np.array_equal(src.pixel_array, arr)  # the input, lossless
    assert outs.sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    two = make_outputs(pred, arr, study=info)
    assert two.source.StudyInstanceUID == "1.2.3.4.5.6.7" and two.source.SOPInstanceUID != src.SOPInstanceUID
    with pytest.raises(ValueError, match="patient_sex"):
        StudyInfo(patient_sex="male")
    with pytest.raises(ValueError, match="accession_number"):
        StudyInfo(accession_number="x" * 17)


def test_header_warnings_reach_the_outputs(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    data = make_dx(np.full((120, 100), 900, np.uint16), ViewPosition="LL", StudyInstanceUID="1.2.3",
                   SeriesInstanceUID="1.2.3.1")
    with cxrkit.Detector.from_pretrained("cxr29-demo") as det:
        pred = det.predict([data])[0]
    assert pred.meta["header_issues"] == ["lateral_view"] and any("lateral" in w for w in pred.warnings)
    outs = make_outputs(pred, data, kinds=("sr", "gsps"))
    assert outs.sc is None
    for f in outs.save(tmp_path):
        assert_dciodvfy_clean(f)
    doc = hd.sr.ComprehensiveSR.from_dataset(outs.sr)
    qc = [g for g in doc.content.get_image_measurement_groups() if g.finding_type.value == "INPUT-QC"]
    assert [e.value.value for e in qc[0].get_qualitative_evaluations()] == ["LATERAL-VIEW"]
    notice = [a for a in outs.gsps.GraphicAnnotationSequence if a.GraphicLayer == "CXRKIT_NOTICE"][0]
    texts = [t.UnformattedTextValue for t in notice.TextObjectSequence]
    assert "NOT FOR DIAGNOSTIC USE" in texts[0] and any("lateral view" in t for t in texts)


def test_sc_says_not_for_diagnostic_use_in_pixels_and_header() -> None:
    from cxrkit.dicom.sc import render_burned_in

    gray = np.full((600, 500), 128, np.uint8)
    pred = _pred((600, 500), nodule=_f("nodule", 0.9, True, boxes=[[100, 100, 200, 200]]))
    rgb = render_burned_in(gray, pred, model_name="m", warnings_=["lateral view"])
    top = next(y for y in range(rgb.shape[0]) if (rgb[y] == 128).all(axis=-1).sum() > 400)  # first image row
    band = rgb[:top]
    assert top > 10 and ((band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 80)).sum() > 50  # yellow text
    body = rgb[top:top + 600]
    assert body.shape[:2] == (600, 500)
    assert (body[150, 20] == 128).all() and not (body[100, 150] == 128).all()  # gray image; a box edge is drawn
    assert rgb.shape[0] > top + 600  # the bottom band with the findings and the warning


def test_errors_are_typed(tmp_path: Path) -> None:
    from cxrkit.errors import DecodeError

    data = make_dx(np.full((40, 50), 7, np.uint16), StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4")
    failed = Prediction(source="x.dcm", index=0, error=DecodeError("x.dcm", "broken"))
    with pytest.raises(InputError, match="failed prediction"):
        make_outputs(failed, data)
    with pytest.raises(InputError, match="40x50"):
        make_outputs(_pred((41, 50)), data)
    with pytest.raises(InputError, match="no StudyInstanceUID"):
        make_outputs(_pred((48, 64)), make_dx())  # a DICOM without Study/Series UIDs
    with pytest.raises(ValueError, match="unknown output kind"):
        make_outputs(_pred((40, 50)), data, kinds=("sr", "pdf"))


def test_invalid_source_values_are_left_empty_with_a_warning(shared_data: Path, tmp_path: Path) -> None:
    require_tool("dciodvfy")
    path = shared_data / "torchxrayvision" / "Fake_MONOHR1.dcm"  # Patient's Age "62" is not a valid AS
    pred = _pred((1024, 1024), nodule=_f("nodule", 0.1, False))
    outs = make_outputs(pred, str(path), kinds=("sr", "gsps"))
    assert any("PatientAge" in w for w in outs.warnings)
    for f in outs.save(tmp_path):
        assert_dciodvfy_clean(f)


def test_cli_predict_dicom_out(shared_data: Path, tmp_path: Path) -> None:
    from cxrkit.cli import main

    png = shared_data / "torchxrayvision" / "00000001_000.png"
    dcm = shared_data / "dicom" / "dx-tiny-monochrome1.dcm"
    out = tmp_path / "dicom"
    rc = main(["predict", str(png), str(dcm), "--out", str(tmp_path / "p.jsonl"), "--dicom-out", str(out),
               "--dicom-outputs", "sr,sc", "--patient-id", "P7", "--accession-number", "A1"])
    assert rc == 0
    objs = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    assert sorted(o.Modality for o in objs) == ["OT", "OT", "OT", "SR", "SR"]  # the PNG's own SC, 2 SC, 2 SR
    src_study = pydicom.dcmread(dcm, stop_before_pixels=True).StudyInstanceUID
    for o in objs:
        if o.StudyInstanceUID != src_study:  # the PNG's new Study carries the identifiers given
            assert (o.PatientID, o.AccessionNumber) == ("P7", "A1")
    assert sum(o.StudyInstanceUID == src_study for o in objs) == 2


def test_missing_highdicom_says_what_to_install(monkeypatch) -> None:
    import importlib.util

    from cxrkit.errors import BackendUnavailableError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'cxrkit\[dicom\]'"):
        make_outputs(_pred((40, 50)), np.zeros((40, 50), np.uint8))
