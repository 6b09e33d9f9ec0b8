"""cxrkit.ray.predict_dataset on a small local Ray cluster (2 CPUs, no dashboard).

Rows must equal Detector.predict on the same inputs; a bad input is an error row, not a failed job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

from probe_images import PROBE_LEVELS_U8, png_bytes, probe_image, strip_timings  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'cxrkit[ray]'")
    pytest.importorskip("ray.data")
    old = os.environ.get("PYTHONPATH")
    # Workers import cxrkit (and this test module's helpers) the way the driver does.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def probe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_imgs")
    shapes = [(256, 256), (300, 420), (512, 380), (200, 200), (640, 512)]
    paths = []
    for i, (h, w) in enumerate(shapes):
        img = probe_image(h, w, PROBE_LEVELS_U8[i % 6: i % 6 + 2], seed=i)
        p = d / f"img{i}.png"
        p.write_bytes(png_bytes(img))
        paths.append(str(p))
    bad = d / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # PNG signature, nothing after it
    paths.insert(2, str(bad))
    paths.append(str(d / "missing.png"))
    return paths


def _rows_by_index(ds) -> list[dict]:
    return sorted(ds.take_all(), key=lambda r: r["index"])


def test_predict_dataset_rows_equal_detector_predict(ray_cluster, probe_files, tmp_path):
    import cxrkit
    import cxrkit.ray

    with cxrkit.Detector.from_pretrained("cxr-probe") as det:
        expected = [strip_timings(p.to_dict()) for p in det.predict(probe_files)]
    assert sum(1 for e in expected if e["error"] is None) == 5
    assert any(e["findings"] and any(f["positive"] for f in e["findings"].values()) for e in expected)

    out = tmp_path / "preds.parquet"
    ds = cxrkit.ray.predict_dataset(probe_files, model="cxr-probe", concurrency=1, batch_size=3, output=str(out))
    rows = _rows_by_index(ds)
    assert [r["index"] for r in rows] == list(range(len(probe_files)))
    assert [r["source"] for r in rows] == probe_files
    for r, e in zip(rows, expected):
        got = strip_timings(json.loads(r["prediction"]))
        assert got == e
        assert r["ok"] == (e["error"] is None)
        if not r["ok"]:
            assert r["error"].startswith(e["error"]["type"] + ": ")
    assert out.is_dir() and any(out.glob("*.parquet"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cxrkit.ray.predict_dataset(probe_files, model="cxr-probe", output=str(out))


def test_predict_dataset_bytes_with_paths_to_jsonl(ray_cluster, probe_files, tmp_path):
    import ray

    import cxrkit
    import cxrkit.ray

    good = [p for p in probe_files if os.path.exists(p)]
    src = ray.data.read_binary_files(good, include_paths=True)
    out = tmp_path / "preds.jsonl"
    ds = cxrkit.ray.predict_dataset(src, model="cxr-probe", batch_size=4, output=str(out))
    rows = {r["source"].split("/")[-1]: r for r in ds.take_all()}
    with cxrkit.Detector.from_pretrained("cxr-probe") as det:
        for p in good:
            e = strip_timings(det.predict([Path(p).read_bytes()])[0].to_dict())
            got = strip_timings(json.loads(rows[Path(p).name]["prediction"]))
            assert got["findings"] == e["findings"] and got["image_size"] == e["image_size"]
            assert got["source"].endswith(Path(p).name) and got["index"] is None
            assert (got["error"] is None) == (e["error"] is None)
    assert any(out.glob("*.json*"))


class _FailingDetector:
    def predict(self, inputs, batch_size=None):
        if any(b"boom" in x for x in inputs):
            raise RuntimeError("device fell over")
        from cxrkit.results import Prediction

        return [Prediction(source=f"<bytes {len(x)} B #{i}>", index=i) for i, x in enumerate(inputs)]


def _failing_factory():
    return _FailingDetector()


def test_whole_batch_failure_gives_error_rows_not_a_failed_job(ray_cluster):
    import cxrkit.ray

    items = [b"fine-0", b"fine-1", b"boom", b"fine-3"]
    ds = cxrkit.ray.predict_dataset(items, model=_failing_factory, batch_size=2)
    rows = _rows_by_index(ds)
    assert [r["ok"] for r in rows] == [True, True, False, False]
    assert rows[2]["error"].startswith("BackendError: ") and "device fell over" in rows[2]["error"]
    # named as Detector.predict(items) names them: by position in the whole list
    assert [json.loads(r["prediction"])["source"] for r in rows][:2] == ["<bytes 6 B #0>", "<bytes 6 B #1>"]
    assert [json.loads(r["prediction"])["index"] for r in rows] == [0, 1, 2, 3]


def test_argument_errors(ray_cluster, tmp_path):
    import ray

    import cxrkit.ray

    with pytest.raises(TypeError, match="paths or bytes"):
        cxrkit.ray.predict_dataset([1, 2], model=_failing_factory)
    with pytest.raises(TypeError, match="not a mix"):
        cxrkit.ray.predict_dataset(["a.png", b"xx"], model=_failing_factory)
    with pytest.raises(ValueError, match="column"):
        cxrkit.ray.predict_dataset(ray.data.from_items([{"x": 1}]), model=_failing_factory)
    with pytest.raises(ValueError, match="no files"):
        cxrkit.ray.predict_dataset(tmp_path, model=_failing_factory)


def test_missing_ray_says_what_to_install(monkeypatch):
    import cxrkit.ray
    from cxrkit.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'cxrkit\[ray\]'"):
        cxrkit.ray.predict_dataset(["a.png"])
