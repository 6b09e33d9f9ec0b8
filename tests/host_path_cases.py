"""Recorded results of the Detector as it was before the columnar host path (issue 13), and the
cases that reproduce them.

``python tests/host_path_cases.py --write --old-tree /path/to/worktree`` runs every case through
the code of that tree (a git worktree of the commit before the change, with its cxrkit._C) and
writes ``tests/fixtures/host_path/expected-*.json.gz``; tests/test_results_columns.py runs the same
cases through today's code and compares every field exactly. The model is a copy of the cxr29-demo
package as it was then (``fixtures/host_path/cxr29-demo-58145cf``: card + ONNX), so retraining the
bundled model does not change the comparison; the probe model (cxr-probe) has no learned weights.

A record holds everything a Prediction says, exactly: scores and thresholds as ``float.hex``,
boxes / box scores / points as their raw float32 bytes (hex), the heatmaps' sha256, ``to_dict()``
(timing values dropped, their keys kept), error type and message, warnings, meta, source, index.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURE = HERE / "fixtures" / "host_path"
SNAPSHOT = FIXTURE / "cxr29-demo-58145cf"
SAMPLES = REPO / "samples"
SHARED = Path(os.environ.get("CXRKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def _src(s: str) -> str:
    """Paths recorded relative to where they live, so the fixture does not depend on the checkout."""
    for root, tag in ((str(SHARED), "<SHARED>"), (str(REPO), "<REPO>")):
        s = s.replace(root, tag)
    return s


def _hex(a: np.ndarray) -> str:
    return a.tobytes().hex()


def record(p: Any) -> dict:
    """Everything a Prediction says about its item, exactly (timing values excluded)."""
    d = p.to_dict()
    d["timings_ms"] = sorted(d["timings_ms"])
    d["source"] = _src(d["source"])
    if d["error"] is not None:
        d["error"]["message"] = _src(d["error"]["message"])
    findings = {}
    for k, f in p.findings.items():
        assert f.boxes_xyxy.dtype == np.float32 and f.box_scores.dtype == np.float32
        assert f.points_xy.dtype == np.float32 and not f.boxes_xyxy.flags.writeable
        findings[k] = [float(f.score).hex(), bool(f.positive), float(f.threshold).hex(), list(f.boxes_xyxy.shape),
                       _hex(f.boxes_xyxy), _hex(f.box_scores), _hex(f.points_xy), f.key]
    hm = None
    if p.heatmaps is not None:
        hm = [list(p.heatmaps.shape), str(p.heatmaps.dtype), hashlib.sha256(p.heatmaps.tobytes()).hexdigest()]
    return {
        "source": _src(p.source), "index": p.index, "model": p.model, "ok": p.ok,
        "image_size": list(p.image_size) if p.image_size else None,
        "error": None if p.error is None else [type(p.error).__name__, _src(str(p.error))],
        "warnings": list(p.warnings), "positive_findings": list(p.positive_findings),
        "findings_keys": list(p.findings), "findings": findings, "heatmaps": hm, "to_dict": d,
    }


# -- inputs ------------------------------------------------------------------------------------

def _png_gray(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"))


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG", quality=quality)
    return b.getvalue()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _model_size(arr: np.ndarray, hw: tuple[int, int] = (256, 256)) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(arr).resize((hw[1], hw[0]), Image.BILINEAR))


def sample_inputs() -> list:
    """Real radiographs of samples/ in every input form, with bad items mixed in."""
    png1, png2 = SAMPLES / "00000001_000.png", SAMPLES / "00027426_000.png"
    jpg, dcm = SAMPLES / "41182_2020_203_Fig3_HTML.jpg", SAMPLES / "siim_chest_cr.dcm"
    g1, g2 = _png_gray(png1), _png_gray(png2)
    m1 = _model_size(g1)
    good_jpeg = jpg.read_bytes()
    return [
        str(png1), str(jpg), good_jpeg[: len(good_jpeg) // 3], str(dcm),  # truncated JPEG bytes
        m1, (m1.astype(np.uint16) * 257), png2.read_bytes(), str(SAMPLES / "no-such-file.png"),
        g2, b"%PDF-1.4\n" + b"\0" * 64, dcm.read_bytes(), g1.astype(np.float32) / np.float32(255),
        np.stack([g2, g1, g2], axis=-1), np.zeros((40, 40), np.int64), _jpeg(m1), _png(g2[::2, :]),
        g1.astype(np.float32) * np.float32(3.0), _model_size(g2, (256, 200)), b"", np.full((30, 30), np.nan, np.float32),
        _jpeg(g2[100:400, 50:500], 80), _model_size(g1)[:, :, None].repeat(4, axis=2),
    ]


def probe_inputs() -> list:
    """The geometry probe's squares in every format, two bad items mixed in."""
    from probe_images import encode, random_squares, render

    import pydicom.pixels.utils
    import pydicom.uid

    rng = np.random.default_rng(1313)
    out = []
    real_uid, n_uid = pydicom.uid.generate_uid, iter(range(1000))
    fake = lambda *a, **k: real_uid(entropy_srcs=[f"host-path-{next(n_uid)}"])  # noqa: E731 - same UIDs each run
    pydicom.uid.generate_uid = pydicom.pixels.utils.generate_uid = fake
    try:
        for i, fmt in enumerate(["jpeg", "png8", "png16", "u8", "u16", "f32", "dicom", "dicom-j2k", "u8", "jpeg"]):
            h, w = (256, 256) if i == 8 else (300 + 41 * i, 520 - 29 * i)
            side = int(np.ceil(40 / min(256 / h, 256 / w)))
            out.append(encode(render(h, w, random_squares(rng, h, w, 3, side)), fmt))
    finally:
        pydicom.uid.generate_uid = pydicom.pixels.utils.generate_uid = real_uid
    out.insert(4, b"\xff\xd8\xff\xe0 broken")
    out.insert(9, np.zeros((0, 5), np.uint8))
    return out


def shared_inputs() -> list:
    """Real radiographs of ../shared/data: NIH JPEGs, lungbox JPEG/PNG in several colour modes, DICOMs."""
    nih = sorted((SHARED / "nih14" / "images").glob("*.jpg"))[:10]
    lung = sorted((SHARED / "lungbox" / "images").iterdir())[:10]
    dcm = [SHARED / "dicom" / "nema-rg1" / "RG1_UNCR.dcm", SHARED / "torchxrayvision" / "Fake_MONOHR1.dcm",
           SHARED / "dicom" / "dx-tiny-monochrome1.dcm", SHARED / "dicom" / "corrupt" / "chest-dx-966-broken-j2k.dcm",
           SHARED / "dicom" / "corrupt"]
    return [str(p) for p in nih + lung + dcm]


# -- cases -------------------------------------------------------------------------------------

def _predict(model: str, inputs: Callable[[], list], boxes: str, batch_size: int, heat: bool, how: str = "predict"):
    def run(cxrkit) -> list[dict]:
        with cxrkit.Detector.from_pretrained(model, batch_size=batch_size, boxes=boxes) as det:
            items = inputs()
            if how == "predict":
                preds = det.predict(items, return_heatmaps=heat)
            elif how == "iter-noprefetch":
                preds = list(det.predict_iter(iter(items), return_heatmaps=heat, prefetch=False))
            else:  # one item at a time
                preds = [det.predict(x, return_heatmaps=heat)[0] for x in items]
        return [record(p) for p in preds]

    return run


def _strip_timings(d: dict) -> dict:
    d["timings_ms"] = sorted(d["timings_ms"])
    d["source"] = _src(d["source"])
    if d.get("error"):
        d["error"]["message"] = _src(d["error"]["message"])
    return d


def _cli(boxes: str) -> Callable:
    """`cxrkit predict samples/ --out x.jsonl`: the lines, parsed."""
    def run(cxrkit) -> list[dict]:
        import tempfile

        from cxrkit.cli import main

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "preds.jsonl"
            assert main(["predict", str(SAMPLES), str(SAMPLES / "README.md"), "--model", str(SNAPSHOT),
                         "--batch-size", "3", "--boxes", boxes, "--out", str(out)]) == 0
            lines = out.read_text().splitlines()
        return [_strip_timings(json.loads(line)) for line in lines]

    return run


def _ray_actor(cxrkit) -> list[dict]:
    """cxrkit.ray's map_batches callable on one Arrow batch (paths, a missing file, no index for one)."""
    import pyarrow as pa

    from cxrkit.ray import DetectorActor

    paths = [str(p) for p in sorted(SAMPLES.iterdir())] + [str(SAMPLES / "missing.png")]
    table = pa.table({"index": [10 + i for i in range(len(paths))], "path": paths})
    actor = DetectorActor(str(SNAPSHOT), "path", None, 4, "cpu", {"boxes": "all"})
    rows = actor(table).to_pylist()
    actor.detector.close()
    for r in rows:
        r["prediction"] = _strip_timings(json.loads(r["prediction"]))
        r["source"] = _src(r["source"])
        r["error"] = r["error"] and _src(r["error"])
    return rows


def cases() -> dict[str, Callable]:
    snap = str(SNAPSHOT)
    return {
        "samples-positive": _predict(snap, sample_inputs, "positive", 4, False),
        "samples-all-heatmaps": _predict(snap, sample_inputs, "all", 3, True),
        "samples-all-b8-iter": _predict(snap, sample_inputs, "all", 8, False, "iter-noprefetch"),
        "samples-positive-single": _predict(snap, sample_inputs, "positive", 8, False, "single"),
        "probe-positive": _predict("cxr-probe", probe_inputs, "positive", 4, False),
        "probe-all-heatmaps": _predict("cxr-probe", probe_inputs, "all", 5, True),
        "shared-all": _predict(snap, shared_inputs, "all", 8, False),
        "shared-positive-heatmaps": _predict(snap, shared_inputs, "positive", 6, True),
        "cli-jsonl-all": _cli("all"),
        "cli-jsonl-positive": _cli("positive"),
        "ray-actor": _ray_actor,
    }


def expected_path(name: str) -> Path:
    return FIXTURE / f"expected-{name}.json.gz"


def load_expected(name: str) -> list[dict]:
    with gzip.open(expected_path(name), "rt") as f:
        return json.load(f)


def network_fingerprint(cxrkit, model: str, inputs: list) -> str:
    """sha256 of the raw network outputs for the readable inputs, one image per call: equal only
    where preprocessing and ONNX Runtime give this machine the same bits as the recording one."""
    from cxrkit.io import load_item

    h = hashlib.sha256()
    with cxrkit.Detector.from_pretrained(model, batch_size=1) as det:
        for i, x in enumerate(inputs):
            try:
                img = load_item(x, i)
            except Exception:
                continue
            pre = det.preprocessor.run([img])
            if not pre.ok_positions:
                continue
            out = det.runner.infer(pre.batch)
            h.update(np.asarray(out["logits"], np.float32).tobytes())
            h.update(np.asarray(out["heatmaps"], np.float32).tobytes())
    return h.hexdigest()


def _write(old_tree: str) -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, old_tree)
    sys.path.insert(1, str(HERE))
    import cxrkit

    assert Path(cxrkit.__file__).resolve().is_relative_to(Path(old_tree).resolve()), cxrkit.__file__
    FIXTURE.mkdir(parents=True, exist_ok=True)
    nets = {"snapshot-samples": network_fingerprint(cxrkit, str(SNAPSHOT), sample_inputs()),
            "probe": network_fingerprint(cxrkit, "cxr-probe", probe_inputs())}
    if SHARED.is_dir():
        nets["snapshot-shared"] = network_fingerprint(cxrkit, str(SNAPSHOT), shared_inputs())
    (FIXTURE / "network-outputs.json").write_text(json.dumps(nets, indent=1) + "\n")
    for name, run in cases().items():
        if name.startswith("shared") and not SHARED.is_dir():
            continue
        recs = run(cxrkit)
        with gzip.open(expected_path(name), "wt", compresslevel=9) as f:
            json.dump(recs, f, separators=(",", ":"))
        print(name, len(recs), "records")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--old-tree", required=True, help="a checkout of the code to record (with its cxrkit._C)")
    a = ap.parse_args()
    if a.write:
        _write(a.old_tree)
