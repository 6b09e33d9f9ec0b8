"""The Detector's stages (cxrkit/_stages) one by one: localize against its per-finding reference,
the columns and their views, the writers, the read stage, the prefetch thread and the typed
errors of a failing batch."""

from __future__ import annotations

import inspect
import io
import json
import math
import pickle
import threading

import numpy as np
import pytest

import cxrkit
from cxrkit._stages._reference import findings_reference
from cxrkit._stages.localize import Localizer, map_to_source
from cxrkit._stages.prefetch import Prefetcher, chunks
from cxrkit._stages.read import Reader
from cxrkit.config import Limits, LocalizeConfig
from cxrkit.errors import BackendError, BatchFailedError, DecodeError, ImageTooLargeError, InputError, OutOfMemoryError
from cxrkit.models import load_model_package
from cxrkit.preprocess.letterbox import letterbox_geometry
from cxrkit.results import BatchColumns, Finding, Prediction, _FindingsView, write_jsonl
from test_postprocess_cases import smooth_logits

FITS = [f for f in ("letterbox", "center_crop", "stretch")
        if f == "letterbox" or "fit" in inspect.signature(letterbox_geometry).parameters]


class _Card:
    """A card with labels outside the 29-finding ontology (imported models keep their own)."""

    def __init__(self, K: int, rng) -> None:
        self.labels = tuple(f"label_{k}" for k in range(K - 1)) + ("nodule",)
        self.thresholds = rng.uniform(0.05, 0.95, K).astype(np.float32)
        self.enabled = rng.random(K) > 0.2
        self.heatmap_thresholds = np.where(self.enabled, rng.uniform(0.05, 0.6, K), 2.0).astype(np.float32)
        self.heatmap_stride = int(rng.choice([4, 8, 16]))


def _transforms(rng, B: int, fit: str, input_hw=(64, 64)):
    out = []
    for _ in range(B):
        hw = (int(rng.integers(20, 3000)), int(rng.integers(20, 3000)))
        out.append(letterbox_geometry(hw, input_hw, fit) if fit != "letterbox" else letterbox_geometry(hw, input_hw))
    return out


def _same_finding(a: Finding, b: Finding) -> None:
    assert a.key == b.key and type(a.score) is float and a.score.hex() == b.score.hex()
    assert a.positive is b.positive and a.threshold.hex() == b.threshold.hex()
    for x, y in ((a.boxes_xyxy, b.boxes_xyxy), (a.box_scores, b.box_scores), (a.points_xy, b.points_xy)):
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape and x.tobytes() == y.tobytes()
        assert not x.flags.writeable
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("boxes", ["positive", "all"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gather", ["C++", "numpy"])
def test_localizer_equals_the_per_finding_reference(fit, boxes, seed, gather):
    rng = np.random.default_rng(seed)
    B, K = int(rng.integers(1, 9)), int(rng.integers(1, 12))
    card = _Card(K, rng)
    h = w = 64 // card.heatmap_stride
    heat = smooth_logits(rng, (B, K, h, w), radius=1, offset=float(rng.uniform(-3, 1)))
    if seed == 2:
        heat[0, 0, 1, 1] = np.nan  # NaN cells: never peaks
    dead = np.flatnonzero(card.heatmap_thresholds >= 1)
    if seed == 1 and dead.size:
        heat[-1, dead[0], 1, 2] = np.inf  # the one cell a disabled finding's map can peak at
    logits = (rng.standard_normal((B, K)) * 3).astype(np.float32)
    out = {"logits": logits, "heatmaps": heat}
    tfs = _transforms(rng, B, fit)
    cfg = LocalizeConfig(max_peaks=int(rng.integers(1, 6)))
    loc = Localizer(card, cfg, boxes)
    if gather == "numpy":  # the gather of the reported peaks without cxrkit._C.gather_peaks
        loc._gather = None
    cols = loc(out, tfs, return_heatmaps=True)
    ref = findings_reference(card, cfg, boxes, out, tfs, return_heatmaps=True)
    assert len(cols) == B and cols.labels == card.labels
    for r in range(B):
        view = _FindingsView(cols, r)
        assert list(view) == list(card.labels) == list(ref[r]["findings"])
        for key in card.labels:
            _same_finding(view[key], ref[r]["findings"][key])
        assert cols.heatmaps[r].tobytes() == ref[r]["heatmaps"].tobytes()
        p = _pred(view)
        assert p.to_dict()["findings"] == {k: f.to_dict() for k, f in ref[r]["findings"].items()}
        assert p.positive_findings == [k for k, f in ref[r]["findings"].items() if f.positive]


def test_gather_peaks_refuses_counts_outside_the_slots():
    C = pytest.importorskip("cxrkit._C")
    B, K, M = 2, 3, 4
    args = (np.zeros((B, K, M), np.float32), np.zeros((B, K, M, 2), np.int32), np.zeros((B, K, M, 4), np.float32),
            np.ones((B, 6), np.float64), 8.0)
    for bad in (M + 1, -1):
        shown = np.zeros((B, K), np.int32)
        shown[1, 2] = bad
        with pytest.raises(ValueError, match="outside"):
            C.gather_peaks(shown, *args)
    with pytest.raises(ValueError, match="inconsistent"):
        C.gather_peaks(np.zeros((B, K), np.int32), *args[:3], np.ones((B + 1, 6)), 8.0)
    offsets, boxes, points, scores = C.gather_peaks(np.zeros((B, K), np.int32), *args)
    assert offsets.tolist() == [0] * (B * K + 1) and boxes.shape == (0, 4) and points.shape == (0, 2) and scores.shape == (0,)


@pytest.mark.parametrize("fit", FITS)
def test_map_to_source_is_points_to_source_for_every_row(fit):
    rng = np.random.default_rng(5)
    tfs = _transforms(rng, 7, fit)
    rows = rng.integers(0, 7, 500)
    xy = rng.uniform(-20, 90, (500, 2))
    xy[::50] = np.round(xy[::50])  # exact cell edges too
    got = map_to_source(xy, rows, tfs)
    want = np.stack([tfs[r].points_to_source(xy[i:i + 1])[0] for i, r in enumerate(rows)])
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


def _pred(view) -> Prediction:
    return Prediction(source="x", index=0, findings=view, model="m")


def _columns(rng, B=3, K=4, n_per=(0, 2, 1)) -> BatchColumns:
    shown = rng.choice(n_per, (B, K))
    offsets = np.concatenate([[0], np.cumsum(shown.reshape(-1))]).astype(np.int64)
    n = int(offsets[-1])
    return BatchColumns(tuple(f"k{i}" for i in range(K)), rng.random((B, K), dtype=np.float32),
                        rng.random((B, K)) > 0.5, [0.5] * K, offsets,
                        rng.uniform(0, 500, (n, 4)).astype(np.float32), rng.random(n, dtype=np.float32),
                        rng.uniform(0, 500, (n, 2)).astype(np.float32))


def test_findings_view_behaves_as_the_dict_it_stands_for():
    cols = _columns(np.random.default_rng(0))
    view = _FindingsView(cols, 1)
    plain = dict(view)
    assert len(view) == 4 and list(view) == ["k0", "k1", "k2", "k3"] and "k2" in view and "zz" not in view
    assert view["k1"] is view["k1"]  # made once
    with pytest.raises(KeyError):
        view["zz"]
    assert view.get("zz") is None and list(view.keys()) == list(plain)
    with pytest.raises(TypeError):
        view["k0"] = None  # read-only
    assert view["k0"].boxes_xyxy.flags.writeable is False
    back = pickle.loads(pickle.dumps(_pred(view)))
    assert type(back.findings) is dict and list(back.findings) == list(plain)
    for k in plain:
        assert back.findings[k].boxes_xyxy.tobytes() == plain[k].boxes_xyxy.tobytes()
    assert _FindingsView(cols, 0) != {} and Prediction(source="e", index=0).findings == {}


def test_columns_refuse_inconsistent_shapes():
    cols = _columns(np.random.default_rng(1))
    with pytest.raises(ValueError, match="offsets end at"):
        BatchColumns(cols.labels, cols.scores, cols.positive, cols.thresholds, cols.offsets,
                     cols.boxes_xyxy[:0], cols.box_scores, cols.points_xy)
    with pytest.raises(ValueError, match="inconsistent"):
        BatchColumns(cols.labels[:2], cols.scores, cols.positive, cols.thresholds, cols.offsets,
                     cols.boxes_xyxy, cols.box_scores, cols.points_xy)


def test_to_dict_mutation_does_not_leak_into_later_calls():
    cols = _columns(np.random.default_rng(2), n_per=(2,))
    p = _pred(_FindingsView(cols, 0))
    d = p.to_dict()
    d["findings"]["k0"]["boxes_xyxy"][0][0] = -1.0
    d["findings"]["k0"]["boxes_xyxy"].append([0, 0, 0, 0])
    assert p.to_dict()["findings"]["k0"] == p.findings["k0"].to_dict()


def test_to_json_and_write_jsonl_hold_the_content_of_json_dumps(tmp_path):
    cols = _columns(np.random.default_rng(3))
    preds = [Prediction(source=f"s{i}", index=i, findings=_FindingsView(cols, i), image_size=(10, 20), model="m",
                        timings_ms={"load": 0.1234567}, meta={"spacing": np.float32(0.5), "u": "µ", "arr": np.arange(2)},
                        warnings=("w",)) for i in range(3)]
    preds.append(Prediction(source="bad", index=3, error=DecodeError("bad", "broken")))
    want = [json.loads(json.dumps(p.to_dict())) for p in preds]
    assert [json.loads(p.to_json()) for p in preds] == want
    buf = io.StringIO()
    assert write_jsonl(preds, buf) == 4
    assert [json.loads(x) for x in buf.getvalue().splitlines()] == want
    with open(tmp_path / "b.jsonl", "wb") as f:
        write_jsonl(preds, f)
    with open(tmp_path / "t.jsonl", "w") as f:
        write_jsonl(preds, f)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "t.jsonl").read_bytes()


def test_to_json_writes_non_finite_numbers_as_json_dumps_does():
    rng = np.random.default_rng(4)
    cols = _columns(rng, n_per=(1,))
    cols.scores[0, 1] = np.nan
    p = _pred(_FindingsView(cols, 0))
    text = p.to_json().decode()
    assert "NaN" in text and json.loads(text)["findings"]["k1"]["score"] != json.loads(text)["findings"]["k1"]["score"]
    q = Prediction(source="x", index=0, meta={"v": math.inf})
    assert json.loads(q.to_json())["meta"]["v"] == math.inf


# -- read stage --------------------------------------------------------------------------------

def _jpeg(h=40, w=30) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.full((h, w), 100, np.uint8)).save(b, format="JPEG")
    return b.getvalue()


def test_read_stage_gives_load_items_results_and_errors_in_order(tmp_path):
    from probe_images import encode

    good = tmp_path / "a.jpg"
    good.write_bytes(_jpeg())
    dcm = tmp_path / "c.dcm"
    dcm.write_bytes(encode(np.full((50, 60), 0.3), "dicom"))
    (tmp_path / "big.jpg").write_bytes(_jpeg() + b"\0" * 5000)
    items = [str(good), str(tmp_path / "missing.png"), str(tmp_path), np.zeros((8, 8), np.uint8), dcm,
             _jpeg(20, 25), str(tmp_path / "big.jpg"), np.zeros((4, 4), np.int64), b"%PDF-", str(dcm),
             np.ones((600, 600), np.float32)]
    limits = Limits(max_file_bytes=4000)
    chunk = list(enumerate(items, start=10))
    for threads in (1, 3):
        reader = Reader(limits=limits, voi_window_index=0, keep_j2k_frame=False, strict=False, num_threads=threads)
        try:
            got = reader.read(chunk)
        finally:
            reader.close()
        assert len(got.loaded) == len(items)
        for pos, (index, item) in enumerate(chunk):
            try:
                want = cxrkit.io.load_item(item, index, limits=limits)
            except InputError as e:
                assert got.loaded[pos] is None and type(got.errors[pos]) is type(e), (threads, pos)
                assert str(got.errors[pos]) == str(e) and got.errors[pos].source == e.source
                continue
            img = got.loaded[pos]
            assert pos not in got.errors and img.source == want.source and img.index == index
            assert img.format == want.format and img.image_size == want.image_size and img.meta == want.meta
            assert img.encoded == want.encoded and img.warnings == want.warnings
            assert (img.pixels is None) == (want.pixels is None)
            if img.pixels is not None:
                assert img.pixels.tobytes() == want.pixels.tobytes()
        assert isinstance(got.errors[6], ImageTooLargeError) and "directory" in str(got.errors[2])


def test_read_bytes_reads_the_whole_file_and_checks_the_limit(tmp_path):
    from cxrkit.io.sources import read_bytes

    p = tmp_path / "x.bin"
    data = bytes(range(256)) * 1000
    p.write_bytes(data)
    assert read_bytes(p) == data and read_bytes(str(p)) == data
    with pytest.raises(ImageTooLargeError, match="max_file_bytes"):
        read_bytes(p, limits=Limits(max_file_bytes=1000))
    with pytest.raises(InputError, match="file not found"):
        read_bytes(tmp_path / "nope")
    with pytest.raises(InputError, match="is a directory"):
        read_bytes(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    assert read_bytes(tmp_path / "empty") == b""


# -- prefetch ----------------------------------------------------------------------------------

def test_prefetch_uses_one_thread_per_detector_and_none_for_one_chunk():
    pf = Prefetcher(name="cxrkit-test-prefetch")
    seen: list[str] = []

    def prep(c):
        seen.append(threading.current_thread().name)
        return [i for i, _ in c]

    assert list(pf.run(chunks(range(5), 8), prep)) == [[0, 1, 2, 3, 4]]
    assert seen == [threading.current_thread().name] and pf._pool is None  # no thread for one chunk
    got = list(pf.run(chunks(range(20), 4), prep))
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    pool = pf._pool
    assert pool is not None and any(n.startswith("cxrkit-test-prefetch") for n in seen)
    assert list(pf.run(chunks(range(9), 4), prep, prefetch=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    list(pf.run(chunks(range(12), 4), prep))
    assert pf._pool is pool  # the same executor for every call
    it = pf.run(chunks(range(40), 4), prep)
    next(it)
    it.close()  # an abandoned iterator
    pf.close()
    assert pf._pool is None and pool._shutdown
    with pytest.raises(cxrkit.errors.DetectorClosedError):
        list(pf.run(chunks(range(12), 4), prep))


def test_detector_makes_no_thread_per_predict_call():
    from probe_images import encode, random_squares, render

    rng = np.random.default_rng(0)
    imgs = [encode(render(200, 200, random_squares(rng, 200, 200, 1, 40)), "u8") for _ in range(9)]
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=2) as det:
        det.predict(imgs)
        before = {t.ident for t in threading.enumerate()}
        for _ in range(3):
            det.predict(imgs)
            list(det.predict_iter(iter(imgs), batch_size=3))
        assert {t.ident for t in threading.enumerate()} <= before
    assert not any(t.name.startswith(("cxrkit-prefetch", "cxrkit-load")) for t in threading.enumerate())


# -- failing batches ---------------------------------------------------------------------------

def _probe_inputs(n=6):
    from probe_images import encode, random_squares, render

    rng = np.random.default_rng(9)
    return [encode(render(240, 300, random_squares(rng, 240, 300, 2, 40)), "u8") for _ in range(n)]


def test_an_unexpected_error_in_inference_is_a_typed_error_per_item(monkeypatch):
    items = _probe_inputs()
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=3) as det:
        clean = [p.to_dict()["findings"] for p in det.predict(items)]
        calls = []

        def broken(batch):
            calls.append(int(batch.shape[0]))
            if len(calls) == 1:
                raise TypeError("heatmaps of an unsupported dtype")
            return real(batch)

        real = det.runner._infer_impl
        monkeypatch.setattr(det.runner, "_infer_impl", broken)
        preds = det.predict(items)  # does not raise
        for p in preds[:3]:
            assert isinstance(p.error, BatchFailedError) and isinstance(p.error, BackendError)
            assert isinstance(p.error.__cause__, TypeError) and "TypeError" in str(p.error)
            assert p.findings == {} and p.image_size == (240, 300)
        assert len({id(p.error) for p in preds[:3]}) == 3
        assert [p.to_dict()["findings"] for p in preds[3:]] == clean[3:]  # the next batch is fine
        monkeypatch.setattr(det._inference, "localize", lambda *a: (_ for _ in ()).throw(ValueError("post-processing bug")))
        preds = det.predict(items[:2])
        assert all(isinstance(p.error, BatchFailedError) and "post-processing bug" in str(p.error) for p in preds)


def test_out_of_memory_in_post_processing_is_retried_like_inference(monkeypatch, caplog):
    items = _probe_inputs(8)
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=8) as det:
        clean = [p.to_dict()["findings"] for p in det.predict(items)]
        real = det._inference.localize
        sizes = []

        def localize(out, transforms, heat):
            sizes.append(len(transforms))
            if len(transforms) > 2:  # a host allocation failure, as numpy raises it
                raise MemoryError(f"Unable to allocate array for {len(transforms)} images")
            return real(out, transforms, heat)

        monkeypatch.setattr(det._inference, "localize", localize)
        with caplog.at_level("WARNING", logger="cxrkit.api"):
            preds = det.predict(items)
        assert [p.to_dict()["findings"] for p in preds] == clean
        assert sizes == [8, 4, 2, 2, 2, 2] and det._inference.step == 2
        assert "out of memory" in caplog.text
        sizes.clear()
        monkeypatch.setattr(det._inference, "localize", lambda *a: (_ for _ in ()).throw(MemoryError("no memory")))
        preds = det.predict(items[:2])
        assert all(isinstance(p.error, OutOfMemoryError) for p in preds)


def test_batching_detector_gets_per_item_errors_from_a_failing_batch(monkeypatch):
    items = _probe_inputs(3)
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=4) as det:
        monkeypatch.setattr(det.runner, "_infer_impl", lambda b: (_ for _ in ()).throw(RuntimeError("device fell over")))
        with cxrkit.BatchingDetector(det, max_batch=4, max_delay_ms=20) as bd:
            futs = [bd.submit(x) for x in items]
            preds = [f.result(10) for f in futs]
    for p in preds:
        assert isinstance(p.error, BatchFailedError) and "device fell over" in str(p.error)


def test_prediction_fields_of_a_real_model_with_card_labels():
    pkg = load_model_package("cxr-probe")
    with cxrkit.Detector(pkg, batch_size=2) as det:
        p = det.predict(_probe_inputs(1))[0]
    assert list(p.findings) == list(pkg.card.labels) and len(p.findings) == len(pkg.card.labels)
    d = p.to_dict()
    assert list(d["findings"]) == list(pkg.card.labels)
    assert d == json.loads(p.to_json())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_model_size_images_skip_the_resize_with_the_same_bits(dtype):
    """preprocess_reference(fast=True) on an image of the input's size takes the no-resize path; it
    must equal the numpy reference (dense resize at scale 1) bit for bit, windows and inverted ones too."""
    from cxrkit.preprocess.reference import preprocess_reference

    rng = np.random.default_rng(11)
    top = np.iinfo(dtype).max
    px = rng.integers(0, top, (64, 48), dtype=dtype, endpoint=True)
    for vr in [(0.0, float(top)), (10.0, top / 3), (top * 0.8, 5.0), (-3.5, 200.25)]:
        for mean, std in [(0.5, 0.25), (0.485, 0.229)]:
            fast, tf = preprocess_reference(px, vr, (64, 48), mean, std, fast=True)
            ref, tr = preprocess_reference(px, vr, (64, 48), mean, std, fast=False)
            assert fast.dtype == np.float32 and fast.shape == (1, 64, 48) and tf == tr
            assert fast.tobytes() == ref.tobytes(), (vr, mean, std)


def test_preprocess_writes_into_the_row_it_is_given():
    from cxrkit.preprocess.reference import preprocess_reference

    rng = np.random.default_rng(12)
    for px, hw in [(rng.integers(0, 255, (64, 48), dtype=np.uint8), (64, 48)),
                   (rng.integers(0, 65535, (90, 40), dtype=np.uint16), (64, 48))]:
        want, _ = preprocess_reference(px, (0.0, 255.0), hw, 0.5, 0.25, fast=True)
        batch = np.full((3, 1) + hw, np.nan, np.float32)
        got, _ = preprocess_reference(px, (0.0, 255.0), hw, 0.5, 0.25, fast=True, out=batch[1])
        assert np.shares_memory(got, batch) and batch[1].tobytes() == want.tobytes()
        assert np.isnan(batch[0]).all() and np.isnan(batch[2]).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        preprocess_reference(px, (0.0, 255.0), (64, 48), 0.5, 0.25, out=np.zeros((1, 64, 47), np.float32))


def test_strict_refuses_a_lateral_dicom_and_is_off_by_default():
    import pydicom

    from cxrkit.errors import UnsuitableImageError
    from probe_images import encode

    ds = pydicom.dcmread(io.BytesIO(encode(np.full((64, 80), 0.3), "dicom")))
    ds.ViewPosition = "LL"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    lateral = buf.getvalue()
    good = _probe_inputs(1)[0]
    with cxrkit.Detector.from_pretrained("cxr-probe", strict=True) as det:
        p_lat, p_good = det.predict([lateral, good])
    assert isinstance(p_lat.error, UnsuitableImageError) and "lateral" in str(p_lat.error) and p_good.ok
    with cxrkit.Detector.from_pretrained("cxr-probe") as det:
        (p,) = det.predict([lateral])
    assert p.ok and any("lateral" in w for w in p.warnings)


def test_out_of_memory_while_preparing_the_runner_starts_the_retry_lower():
    """Runner.prepare (CUDA-graph capture on a GPU) is called once at construction for every batch
    size; if the largest do not fit, the Detector keeps the size that did as its first slice."""
    from cxrkit.backends import register_backend
    from cxrkit.backends.onnxruntime_runner import OnnxRuntimeRunner

    prepared: list[list[int]] = []

    class TightRunner(OnnxRuntimeRunner):
        name = "tight-test"

        def _prepare_impl(self, batch_sizes):
            prepared.append(list(batch_sizes))
            if max(batch_sizes) > 2:
                raise OutOfMemoryError(f"capture for batch {max(batch_sizes)} does not fit")

    from cxrkit.backends.base import BACKENDS

    register_backend("tight-test", lambda: TightRunner, lambda d, p: None)
    items = _probe_inputs(5)
    try:
        with cxrkit.Detector.from_pretrained("cxr-probe", backend="tight-test", batch_size=8) as det:
            assert prepared == [list(range(1, 9)), [1, 2, 3, 4], [1, 2]]
            assert det._inference.step == 2
            calls = []
            real = det.runner.infer
            det.runner.infer = lambda b: calls.append(int(b.shape[0])) or real(b)
            preds = det.predict(items)
    finally:
        BACKENDS.pop("tight-test", None)
    assert calls == [2, 2, 1] and all(p.ok for p in preds)
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=8) as ref:
        assert [p.to_dict()["findings"] for p in preds] == [p.to_dict()["findings"] for p in ref.predict(items)]
