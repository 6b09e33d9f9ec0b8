"""`cxrkit bench` runs end to end on tiny inputs (no timing asserted: figures live in benchmarks),
and its synthetic DICOMs are what they claim to be."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pydicom = pytest.importorskip("pydicom")


@pytest.mark.parametrize("j2k", [False, True])
def test_write_dicom_round_trips(tmp_path, j2k):
    from cxrkit.bench import synthetic_radiograph, write_dicom
    from cxrkit.io import load_item

    stored = synthetic_radiograph(64, 3, bits=16) >> 4
    path = write_dicom(tmp_path / "x.dcm", stored, j2k=j2k)
    ds = pydicom.dcmread(path)
    assert str(ds.file_meta.TransferSyntaxUID) == ("1.2.840.10008.1.2.4.90" if j2k else "1.2.840.10008.1.2.1")
    np.testing.assert_array_equal(ds.pixel_array, stored)
    img = load_item(str(path), 0)
    assert img.value_range == (48.0, 4047.0) and img.meta["voi"].startswith("window 2048/4000")


def test_bench_command_runs(tmp_path, capsys):
    from cxrkit.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--images", "2", "--size", "96", "--repeat", "1", "--formats", "jpeg,dicom",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["format"] for r in rows] == ["jpeg", "jpeg+dct", "dicom"]
    for r in rows:
        assert r["images"] == 2 and r["cxrkit_img_s"] > 0 and r["baseline_img_s"] > 0 and r["decode_floor_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["cxrkit_img_s"] / r["baseline_img_s"], rel=1e-6)
    text = capsys.readouterr().out
    assert "dicom" in text and "baseline" in text
