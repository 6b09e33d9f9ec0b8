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


def test_bench_command_runs(tmp_path, capsys, monkeypatch):
    import os

    import cxrkit.bench as bench
    from cxrkit.cli import main

    timed = []  # (what was timed, repeats): every measurement gets the same number of repeats
    real_time = bench._time
    monkeypatch.setattr(bench, "_time", lambda fn, repeat: timed.append((fn, repeat)) or real_time(fn, repeat))
    out = tmp_path / "bench.json"
    assert main(["bench", "--images", "2", "--size", "96", "--repeat", "2", "--formats", "jpeg,dicom",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["format"] for r in rows] == ["jpeg", "jpeg+dct", "dicom"]
    for r in rows:
        assert r["images"] == 2 and r["repeat"] == 2 and r["decode_floor_img_s"] > 0
        assert r["cxrkit_img_s"] > 0 and r["baseline_img_s"] > 0 and r["serial_baseline_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["cxrkit_img_s"] / r["baseline_img_s"], rel=1e-6)
        assert r["serial_ratio"] == pytest.approx(r["cxrkit_img_s"] / r["serial_baseline_img_s"], rel=1e-6)
        assert r["baseline"].startswith(f"DataLoader({os.cpu_count()} workers, batch 8)")
    # per format: serial baseline, fair baseline, decode floor, cxrkit (jpeg: and cxrkit+dct)
    assert [rep for _, rep in timed] == [2] * 9
    assert sum(isinstance(fn, bench.FairBaseline) for fn, _ in timed) == 2
    text = capsys.readouterr().out
    assert "dicom" in text and "fair baseline" in text and "serial baseline" in text


def test_fair_baseline_feeds_the_network_what_the_serial_one_does(tmp_path):
    """Same reading, letterbox and model in both baselines; the fair one batches it in DataLoader workers."""
    import torch

    from cxrkit.bench import FairBaseline, LetterboxedImages, write_images
    from cxrkit.models import load_model_package

    model = load_model_package("cxr-probe")
    paths = write_images(tmp_path, 3, 80, "jpeg")
    fair = FairBaseline(model, paths, batch_size=2, workers=1)
    try:
        batches = [x for x in fair.loader]
    finally:
        fair.close()
    assert [tuple(b.shape) for b in batches] == [(2, 1, 256, 256), (1, 1, 256, 256)]
    ds = LetterboxedImages(paths, model.card.input_hw, model.card.mean, model.card.std)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), np.stack([ds[i] for i in range(3)]))
