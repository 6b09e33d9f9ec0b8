"""Isolation: a failing item, or a backend that runs out of memory, leaves every other result
bit-identical to a clean run.

``fingerprint`` (also used by the fuzz and concurrency tests) is a Prediction's result in exact
bytes: scores as float bits, boxes / points / box scores as raw float32 buffers, plus the image
size, warnings and error type; no rounding anywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

import cxrkit
from cxrkit.errors import InputError, OutOfMemoryError
from probe_images import encode, random_squares, render

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def fingerprint(p: "cxrkit.Prediction") -> tuple:
    """Everything a Prediction says about its image, exactly (no timings, no index or source)."""
    return (
        p.image_size,
        None if p.error is None else type(p.error).__name__,
        tuple(p.warnings),
        tuple(
            (k, np.float64(f.score).tobytes(), f.positive, f.boxes_xyxy.tobytes(), f.box_scores.tobytes(),
             f.points_xy.tobytes())
            for k, f in sorted(p.findings.items())
        ),
    )


def probe_batch(seed: int, formats: tuple[str, ...]) -> list:
    """One probe image per format (various sizes), each with two squares that fire."""
    rng = np.random.default_rng(seed)
    out = []
    for i, fmt in enumerate(formats):
        h, w = (300 + 37 * i, 420 - 23 * i)
        side = int(np.ceil(40 / min(256 / h, 256 / w)))
        out.append(encode(render(h, w, random_squares(rng, h, w, 2, side)), fmt))
    return out


FORMATS = ("jpeg", "png8", "png16", "u8", "dicom", "jpeg", "f32", "dicom-j2k")


def _bad_items(tmp_path) -> dict:
    from PIL import Image
    import io

    good_jpeg = probe_batch(1, ("jpeg",))[0]
    b = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(b, format="PNG")
    png = bytearray(b.getvalue())
    png[40] ^= 0xFF  # IDAT data: zlib error
    return {
        "truncated-jpeg": good_jpeg[: len(good_jpeg) // 3],  # DALI's encoded group
        "corrupt-png": bytes(png),
        "truncated-dicom": probe_batch(2, ("dicom",))[0][:700],
        "int64-array": np.zeros((50, 50), np.int64),
        "missing-file": str(tmp_path / "nope.png"),
        "pdf": b"%PDF-1.4\n" + b"\x00" * 100,
        "nan-array": np.full((40, 40), np.nan, np.float32),
    }


@pytest.fixture(scope="module")
def clean_inputs():
    return probe_batch(21, FORMATS)


@pytest.mark.parametrize("device", DEVICES)
def test_failing_item_leaves_others_bit_identical(device, clean_inputs, tmp_path):
    with cxrkit.Detector.from_pretrained("cxr-probe", device=device, batch_size=len(FORMATS)) as det:
        clean = [fingerprint(p) for p in det.predict(clean_inputs)]
        assert all(c[1] is None for c in clean)
        assert all(any(f[2] for f in c[3]) for c in clean)  # every clean image has positives
        bad = _bad_items(tmp_path)
        for n, (kind, item) in enumerate(bad.items()):
            pos = (3 * n + 1) % len(clean_inputs)
            batch = list(clean_inputs)
            batch[pos] = item
            preds = det.predict(batch)
            assert isinstance(preds[pos].error, InputError), (kind, preds[pos])
            assert preds[pos].findings == {}
            for i, p in enumerate(preds):
                if i != pos:
                    assert fingerprint(p) == clean[i], (kind, pos, i)
        # two bad items in one batch, and a batch with nothing readable in it
        batch = list(clean_inputs)
        batch[0], batch[-1] = bad["truncated-jpeg"], bad["corrupt-png"]
        preds = det.predict(batch)
        assert [fingerprint(p) for p in preds[1:-1]] == clean[1:-1]
        preds = det.predict(list(bad.values()))
        assert all(isinstance(p.error, InputError) for p in preds)


def _oom_above(runner, limit: int, calls: list):
    real = runner._infer_impl

    def infer(batch):
        n = int(batch.shape[0])
        calls.append(n)
        if n > limit:
            raise OutOfMemoryError(f"simulated out of memory at batch {n}")
        return real(batch)

    return infer


@pytest.mark.parametrize("device", DEVICES)
def test_oom_retries_with_smaller_batches_and_same_results(device, clean_inputs, monkeypatch, caplog):
    with cxrkit.Detector.from_pretrained("cxr-probe", device=device, batch_size=len(FORMATS)) as det:
        clean = [fingerprint(p) for p in det.predict(clean_inputs)]
        calls: list[int] = []
        monkeypatch.setattr(det.runner, "_infer_impl", _oom_above(det.runner, 2, calls))
        with caplog.at_level("WARNING", logger="cxrkit.api"):
            preds = det.predict(clean_inputs)
        assert [fingerprint(p) for p in preds] == clean
        assert calls == [8, 4, 2, 2, 2, 2], calls  # halves until it fits, then walks the batch
        assert "out of memory" in caplog.text
        # a batch with a failed item (7 readable): still identical, still sliced
        calls.clear()
        batch = list(clean_inputs)
        batch[5] = b"\xff\xd8\xff\xe0 broken"
        preds = det.predict(batch)
        assert isinstance(preds[5].error, InputError)
        assert [fingerprint(p) for i, p in enumerate(preds) if i != 5] == [c for i, c in enumerate(clean) if i != 5]
        # the slice size that fitted (2) is remembered: no failing full-size attempt again
        assert calls == [2, 2, 2, 1], calls


def test_oom_at_batch_one_fails_those_items_only(clean_inputs, monkeypatch):
    """Out of memory even for one image: the items get OutOfMemoryError, predict does not raise,
    and the Detector works again once memory is back."""
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=4) as det:
        clean = [fingerprint(p) for p in det.predict(clean_inputs[:4])]
        calls: list[int] = []
        monkeypatch.setattr(det.runner, "_infer_impl", _oom_above(det.runner, 0, calls))
        preds = det.predict(clean_inputs[:4])
        assert all(isinstance(p.error, OutOfMemoryError) for p in preds)
        assert calls == [4, 2, 1, 1, 1, 1]
        monkeypatch.undo()
        assert [fingerprint(p) for p in det.predict(clean_inputs[:4])] == clean


def test_oom_in_predict_iter_with_prefetch(clean_inputs, monkeypatch):
    """The retry also holds while the prefetch thread prepares the next batch."""
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=4) as det:
        items = clean_inputs * 3
        clean = [fingerprint(p) for p in det.predict(items)]
        calls: list[int] = []
        monkeypatch.setattr(det.runner, "_infer_impl", _oom_above(det.runner, 1, calls))
        got = [fingerprint(p) for p in det.predict_iter(iter(items), batch_size=4)]
        assert got == clean
        assert set(calls) == {4, 2, 1}
