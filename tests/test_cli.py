"""The command line: predict (JSON lines, overlays, per-image errors), info, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrkit.cli import main
from probe_images import Square, encode, render


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(encode(render(300, 400, [Square(0, 40, 40, 140, 140)]), "png8"))
    (d / "b.jpg").write_bytes(encode(render(400, 300, [Square(2, 100, 150, 220, 270)]), "jpeg"))
    (d / "sub").mkdir()
    (d / "sub" / "c.dcm").write_bytes(encode(render(256, 256, [Square(5, 10, 10, 100, 100)]), "dicom"))
    (d / "broken.jpg").write_bytes(encode(render(256, 256, []), "jpeg")[:300])  # truncated
    (d / "notes.txt").write_text("not an image")
    return d


def test_predict_writes_jsonl_overlays_and_per_image_errors(folder, tmp_path, capsys):
    out, ov = tmp_path / "r.jsonl", tmp_path / "ov"
    rc = main(["predict", str(folder), "--model", "cxr-probe", "--out", str(out), "--overlay", str(ov)])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    by = {Path(r["source"]).name: r for r in recs}
    assert set(by) == {"a.png", "b.jpg", "c.dcm", "broken.jpg"}
    assert by["broken.jpg"]["error"]["type"] == "DecodeError"
    assert by["a.png"]["findings"]["nodule"]["positive"] is True
    assert by["b.jpg"]["findings"]["consolidation"]["positive"] is True
    assert by["c.dcm"]["findings"]["cardiomegaly"]["positive"] is True
    x0, y0, x1, y1 = by["a.png"]["findings"]["nodule"]["boxes_xyxy"][0]
    assert 40 <= x0 < 60 and 120 < x1 <= 141
    pngs = sorted(ov.glob("*.png"))
    assert len(pngs) == 3
    im = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert (im[..., 0] != im[..., 1]).any()  # coloured boxes were drawn
    assert "1 with errors" in capsys.readouterr().err


def test_predict_fails_only_when_the_command_fails(folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--model", "cxr-probe"]) == 2  # no images at all
    assert main(["predict", str(folder), "--model", "no-such-model"]) == 1
    assert "ModelError" in capsys.readouterr().err


def test_info_lists_backends_and_models(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "cxr-probe" in info["models"]
    assert info["backends"]["cpu"]["onnxruntime"] is None
    assert info["cpu_kernels"] == "cxrkit._C built"


def test_cxrkit_entry_point_runs_the_readme_command(tmp_path):
    """The installed `cxrkit` console script (not `python -m`), with README's first command verbatim
    but for the output paths: the bundled samples through the default model, one JSON line each."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "cxrkit"]
    assert ep.value == "cxrkit.cli:main"
    exe = Path(sys.executable).with_name("cxrkit")
    assert exe.is_file(), f"{exe} missing: cxrkit is not installed in this environment (pip install -e .)"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "cxrkit predict samples/ --overlay overlays/ --out results.jsonl" in readme
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([str(exe), "predict", "samples/", "--overlay", str(tmp_path / "overlays"),
                        "--out", str(tmp_path / "results.jsonl")], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    samples = sorted(p.name for p in (repo / "samples").iterdir() if p.suffix in (".png", ".jpg", ".dcm"))
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(x["source"]).name for x in recs) == samples
    from cxrkit.models import load_model_package

    labels = load_model_package("cxr29-demo").card.labels
    for rec in recs:
        assert rec["error"] is None and list(rec["findings"]) == list(labels), rec["source"]
        assert all(0.0 <= f["score"] <= 1.0 for f in rec["findings"].values())
    assert len(list((tmp_path / "overlays").glob("*.png"))) == len(samples)
    assert f"{len(samples)} images, 0 with errors, model cxr29-demo" in r.stderr


def test_export(tmp_path):
    import onnx

    out = tmp_path / "probe.onnx"
    assert main(["export", "probe", str(out), "--input-size", "64", "64"]) == 0
    m = onnx.load(str(out))
    assert [o.name for o in m.graph.output] == ["logits", "heatmaps"]
