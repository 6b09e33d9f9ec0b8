"""The header quality gate (cxrkit.io.quality) and ``load_item(strict=...)``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from cxrkit.errors import DecodeError, InputError, UnsuitableImageError  # noqa: E402
from cxrkit.io import load_item  # noqa: E402
from cxrkit.io.quality import header_issues  # noqa: E402
from test_fuzz_headers import make_dx  # noqa: E402


def _codes(ds) -> list[str]:
    return [i.code for i in header_issues(ds)]


def test_frontal_chest_passes_strict_without_warnings() -> None:
    ds = make_dx(raw=True, BodyPartExamined="CHEST", ViewPosition="PA", PixelSpacing=[6.0, 6.0])  # 288 x 384 mm
    assert header_issues(ds) == []
    img = load_item(ds, 0, strict=True)
    assert img.warnings == [] and img.meta["header_issues"] == []


@pytest.mark.parametrize("attrs, code, text", [
    ({"ViewPosition": "LL"}, "lateral_view", "lateral view (ViewPosition LL)"),
    ({"ViewPosition": "RLAT"}, "lateral_view", "lateral view"),
    ({"BodyPartExamined": "KNEE"}, "non_chest_body_part", "BodyPartExamined is KNEE"),
    ({"Modality": "MG"}, "non_radiograph_modality", "modality MG is not a chest radiograph modality"),
])
def test_unsuitable_header_warns_or_refuses(attrs, code, text) -> None:
    data = make_dx(**attrs)
    img = load_item(data, 3)
    assert img.meta["header_issues"] == [code]
    assert any(text in w for w in img.warnings), img.warnings
    with pytest.raises(UnsuitableImageError) as ei:
        load_item(data, 3, strict=True)
    err = ei.value
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    assert "strict=True" in str(err) and text.split(" (")[0] in str(err) and err.source == "<bytes %d B #3>" % len(data)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is UnsuitableImageError and str(again) == str(err)


def test_lateral_from_view_code_sequence_and_decubitus_is_frontal() -> None:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399198007", "SCT", "right lateral"
    ds = make_dx(raw=True, ViewCodeSequence=Sequence([item]))
    assert _codes(ds) == ["lateral_view"]
    item.CodeValue, item.CodeMeaning = "102536004", "left lateral decubitus"
    assert _codes(ds) == []


def test_strict_refuses_before_decoding() -> None:
    # a lateral view whose pixel data is truncated: strict says why it refuses, not that it cannot decode
    data = make_dx(ViewPosition="LL")
    bad = data[:-1000]
    with pytest.raises(DecodeError):
        load_item(bad, 0)
    with pytest.raises(UnsuitableImageError):
        load_item(bad, 0, strict=True)


def test_colour_dicom_is_flagged() -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    rgb = np.zeros((32, 40, 3), np.uint8)
    ds = make_dx(raw=True)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.PixelData = rgb.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    img = load_item(ds, 0)
    assert img.meta["header_issues"] == ["colour_image"]
    assert sum("converted to gray" in w for w in img.warnings) == 1  # said once, not twice
    with pytest.raises(UnsuitableImageError, match="colour DICOM"):
        load_item(ds, 0, strict=True)


def test_implausible_field_of_view_warns_but_strict_reads() -> None:
    ds = make_dx(raw=True, PixelSpacing=[0.1, 0.1])  # 48 x 64 pixels: 4.8 x 6.4 mm
    img = load_item(ds, 0, strict=True)
    assert img.meta["header_issues"] == ["implausible_field_of_view"]
    assert any("field of view 5 x 6 mm" in w for w in img.warnings), img.warnings
    ds.PixelSpacing = [0.0, 0.0]  # invalid spacing: io says so; the gate has nothing to measure
    assert _codes(ds) == []


def test_real_files(shared_data: Path) -> None:
    DATA = shared_data
    cr = DATA / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    assert load_item(str(cr), 0, strict=True).meta["header_issues"] == []
    for name in ("chest-dx-966-j2k.dcm", "dx-tiny-monochrome1.dcm", "nema-rg1/RG1_UNCR.dcm"):
        ds = pydicom.dcmread(DATA / "dicom" / name, stop_before_pixels=True)
        assert header_issues(ds) == [], name
    hip = DATA / "dicom" / "codecs" / "RLE" / "RG2_RLE.dcm"
    assert _codes(pydicom.dcmread(hip, stop_before_pixels=True)) == ["non_chest_body_part"]
    with pytest.raises(UnsuitableImageError, match="BodyPartExamined is HIP"):
        load_item(str(hip), 0, strict=True)
    png = DATA / "torchxrayvision" / "00000001_000.png"
    assert load_item(str(png), 0, strict=True).warnings == []  # no header to check
