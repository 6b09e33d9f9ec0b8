"""`cxrkit eval` (COCO boxes) and `cxrkit build-engine` run as commands, not only parsed.

eval runs the real Detector on a COCO set drawn for the probe model, where the right answer is
known: every labelled square is found (AUROC 1, sensitivity 1), and a set whose labels are
shuffled is not. build-engine without TensorRT (this machine) must fail cleanly, naming the fix,
and write nothing; the engine build itself runs in the ``trt`` tests on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxrkit.cli import main
from probe_images import PROBE_LABELS, Square, encode, render


def _coco_set(root: Path, shuffle_labels: bool = False) -> tuple[Path, Path]:
    """8 images 256 x 256: nodule and/or mass squares, two normal images; COCO boxes of the squares."""
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    layouts = [[0], [1], [0, 1], [], [1], [0], [], [0, 1]]
    for i, ks in enumerate(layouts):
        squares = [Square(k, 24 + 120 * j, 40 + int(rng.integers(0, 100)), 24 + 120 * j + 72, 0) for j, k in enumerate(ks)]
        squares = [Square(s.k, s.x0, s.y0, s.x1, s.y0 + 72) for s in squares]
        name = f"img{i}.png"
        (root / "images" / name).write_bytes(encode(render(256, 256, squares), "png8"))
        images.append({"id": i + 1, "file_name": name, "width": 256, "height": 256})
        for s in squares:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": s.k + 1,
                         "bbox": [s.x0, s.y0, s.x1 - s.x0, s.y1 - s.y0], "size_mm": 20.0})
    if shuffle_labels:  # the boxes of image i given to image i + 3: truth no longer matches the pixels
        for a in anns:
            a["image_id"] = (a["image_id"] + 2) % len(images) + 1
    cats = [{"id": k + 1, "name": PROBE_LABELS[k]} for k in (0, 1)]
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "images", ann


def test_eval_coco_command_measures_the_detector(tmp_path, capsys):
    images, ann = _coco_set(tmp_path / "set")
    out = tmp_path / "metrics.json"
    assert main(["eval", str(images), str(ann), "--model", "cxr-probe", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 8 and res["n_failed"] == 0
    for key, n_pos in (("nodule", 4), ("mass", 4)):
        m = res["findings"][key]
        assert m["evaluated"] and (m["n_pos_images"], m["n_neg_images"]) == (n_pos, 8 - n_pos)
        assert m["auroc"] == 1.0, key
        assert m["froc"]["n_lesions"] == n_pos and m["froc"]["sensitivity"]["0.5"] == 1.0, key
    table = capsys.readouterr().out
    assert "nodule" in table and "mass" in table and "8 images, 0 failed" in table


def test_eval_coco_command_is_not_fooled_by_wrong_labels(tmp_path):
    images, ann = _coco_set(tmp_path / "set", shuffle_labels=True)
    out = tmp_path / "metrics.json"
    assert main(["eval", str(images), str(ann), "--model", "cxr-probe", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(res["findings"][k]["auroc"] < 0.9 for k in ("nodule", "mass")), res["findings"]
    assert all(res["findings"][k]["froc"]["sensitivity"]["0.5"] < 1.0 for k in ("nodule", "mass"))


def test_build_engine_without_tensorrt_fails_cleanly(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the trt tests build engines")
    except ImportError:
        pass
    cache = tmp_path / "engines"
    rc = main(["build-engine", "--model", "cxr-probe", "--precision", "fp16", "--cache-dir", str(cache),
               "--min-batch", "1", "--opt-batch", "4", "--max-batch", "8"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "BackendUnavailableError" in err and "TensorRT is not installed" in err and "pip install" in err
    assert not cache.exists() or not any(cache.iterdir())
    # a bad profile is refused as such, before any TensorRT call
    with pytest.raises(ValueError):
        main(["build-engine", "--model", "cxr-probe", "--cache-dir", str(cache),
              "--min-batch", "8", "--opt-batch", "4", "--max-batch", "2"])
