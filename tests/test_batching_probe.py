"""BatchingDetector with the real Detector and the cxr-probe model: every caller's Prediction
equals ``Detector.predict([item])[0]`` for its item (timings aside), under concurrency."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import cxrkit
from cxrkit.batching import BatchingDetector

from probe_images import PROBE_LEVELS_U8, png_bytes, probe_image, strip_timings


@pytest.fixture(scope="module")
def det():
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=16) as d:
        yield d


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_batching")
    shapes = [(256, 256), (300, 420), (512, 380), (200, 200), (640, 512), (400, 300)]
    out: list = []
    for i, (h, w) in enumerate(shapes):
        img = probe_image(h, w, PROBE_LEVELS_U8[i: i + 2] or PROBE_LEVELS_U8[:1], seed=i)
        out.append(img)  # numpy array
        out.append(png_bytes(img))  # encoded bytes
        p = d / f"probe{i}.png"
        p.write_bytes(png_bytes(img))
        out.append(str(p))  # path
    out.insert(4, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a truncated PNG
    out.insert(9, str(d / "missing.png"))
    return out


def test_probe_fires_on_the_synthetic_squares(det, items):
    preds = det.predict(items)
    assert sum(p.ok for p in preds) == len(items) - 2
    assert all(p.positive_findings for p in preds if p.ok)


def test_results_equal_detector_predict_under_concurrency(det, items):
    expected = [strip_timings(det.predict([x])[0].to_dict()) for x in items]
    with BatchingDetector(det, max_batch=8, max_delay_ms=20) as bd:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda x: bd.predict(x, timeout=60), items * 3))
        stats = bd.stats()
    assert stats["max_batch_size"] > 1
    for g, e in zip(got, expected * 3):
        assert strip_timings(g.to_dict()) == e
        assert "queue" in g.timings_ms


def test_bad_items_keep_their_errors_next_to_good_ones(det, items):
    with BatchingDetector(det, max_batch=16, max_delay_ms=50) as bd:
        futs = [bd.submit(x) for x in items]
        preds = [f.result(60) for f in futs]
    bad = [p for p in preds if not p.ok]
    assert len(bad) == 2
    assert all(isinstance(p.error, cxrkit.InputError) for p in bad)
    assert bad[0].source == "<bytes 48 B #0>" and "#0" in str(bad[0].error)
    assert bad[1].source.endswith("missing.png")


def test_apredict_and_owned_detector_from_a_model_name(items):
    baseline = threading.active_count()

    async def main(bd):
        return await asyncio.gather(*(bd.apredict(x) for x in items))

    with BatchingDetector("cxr-probe", max_batch=16, max_delay_ms=10) as bd:
        preds = asyncio.run(main(bd))
        assert bd.detector.batch_size == 16
    assert len(preds) == len(items) and sum(p.ok for p in preds) == len(items) - 2
    assert threading.active_count() == baseline
