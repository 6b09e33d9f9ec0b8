"""`cxrkit serve` endpoints, through a real HTTP client against a real uvicorn process on localhost.

One server (``python -m cxrkit.cli serve --model cxr-probe``, a 1 MiB body limit) serves every test
of this module; answers are checked against ``Detector.predict`` on the same bytes in this process.
The stress behaviours (queue full, disconnects, SIGTERM drain) are in test_serve_stress.py.
"""

from __future__ import annotations

import json
import socket
import struct
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

import cxrkit  # noqa: E402

from probe_images import PROBE_LABELS, encode, random_squares, render, strip_timings  # noqa: E402
from serve_util import start  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = start(["-m", "cxrkit.cli", "serve", "--model", "cxr-probe", "--max-body-mb", "1", "--max-parts", "4"], log)
    yield srv
    assert srv.stop() == 0, srv.output()[-2000:]


@pytest.fixture(scope="module")
def det():
    with cxrkit.Detector.from_pretrained("cxr-probe", batch_size=32) as d:
        yield d


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _image(h: int, w: int, seed: int):
    rng = np.random.default_rng(seed)
    squares = random_squares(rng, h, w, 2, min_side=max(8, min(h, w) // 6))
    return render(h, w, squares), squares


def _expected(det, data: bytes) -> dict:
    return strip_timings(det.predict([data])[0].to_dict())


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h 8-bit gray pixels, followed by one empty IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_healthz_and_readyz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["queue_depth"] == 0 and body["max_queue"] == 256


def test_models_is_the_card_summary(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    (m,) = r.json()["models"]
    card = cxrkit.models.load_model_package("cxr-probe").card
    assert m["name"] == "cxr-probe" and m["version"] == card.version and m["loaded"] is True
    assert m["labels"] == list(card.labels) and m["input_size"] == list(card.input_hw)
    assert m["thresholds"] == pytest.approx(dict(zip(card.labels, card.thresholds.tolist())))
    assert m["backend"] == "onnxruntime" and m["device"] == "cpu" and m["max_batch"] == 32


@pytest.mark.parametrize("fmt,ctype", [("png8", "image/png"), ("jpeg", None), ("png16", "application/octet-stream"),
                                       ("dicom", "application/dicom"), ("png8", "image/jpeg")])
def test_predict_raw_body_equals_detector_predict(client, det, fmt, ctype):
    """Raw bytes of each format (the format is sniffed: a wrong or missing Content-Type does not matter);
    the JSON is the Prediction of Detector.predict on the same bytes, boxes in original pixels."""
    unit, squares = _image(300, 420, seed=zlib.crc32(fmt.encode()) % 1000)
    data = encode(unit, fmt)
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post("/v1/predict", content=data, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    assert set(got["timings_ms"]) >= {"load", "queue"}
    assert strip_timings(got) == _expected(det, data)
    assert got["image_size"] == [300, 420] and got["source"] == f"<bytes {len(data)} B #0>"
    for s in squares:  # each square's finding is boxed where the square is in the ORIGINAL image
        f = got["findings"][s.key]
        assert f["positive"], (fmt, s)
        x0, y0, x1, y1 = f["boxes_xyxy"][0]
        assert max(abs(x0 - s.x0), abs(y0 - s.y0), abs(x1 - s.x1), abs(y1 - s.y1)) <= 16


def test_predict_multipart_several_files(client, det):
    a = encode(_image(256, 256, 1)[0], "png8")
    b = encode(_image(320, 240, 2)[0], "jpeg")
    bad = a[: len(a) // 2]
    files = [("file", ("a.png", a, "image/png")), ("file", ("b.jpg", b, "image/jpeg")),
             ("file", ("broken.png", bad, "image/png"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["statuses"] == [200, 200, 422]
    preds = body["predictions"]
    assert [p["source"] for p in preds] == ["a.png", "b.jpg", "broken.png"]
    assert [p["index"] for p in preds] == [0, 1, 2]
    for p, data in zip(preds[:2], (a, b)):
        exp = _expected(det, data)
        exp["source"], exp["index"] = p["source"], p["index"]
        assert strip_timings(p) == exp
    assert preds[2]["error"]["type"] == "DecodeError" and "'broken.png'" in preds[2]["error"]["message"]


def test_multipart_all_bad_gets_the_items_status(client):
    files = [("file", ("notes.txt", b"hello, not an image", "text/plain"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 415
    assert r.json()["statuses"] == [415]
    assert r.json()["predictions"][0]["error"]["type"] == "UnsupportedFormatError"


def test_multipart_limits_and_malformed(client):
    png = encode(_image(64, 64, 3)[0], "png8")
    r = client.post("/v1/predict", files=[("file", (f"{i}.png", png, "image/png")) for i in range(5)])
    assert r.status_code == 400 and "more than 4 parts" in r.json()["error"]["message"]
    r = client.post("/v1/predict", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]["message"]


@pytest.mark.parametrize("data,status,err,text", [
    (b"name,age\nnot an image,42\n", 415, "UnsupportedFormatError", "plain text"),
    (b"GIF89a" + b"\x00" * 64, 415, "UnsupportedFormatError", "GIF"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "DecodeError", ""),
    (_png_header_only(30000, 30000), 413, "ImageTooLargeError", "max_pixels"),
])
def test_bad_input_gets_its_typed_error_naming_the_input(client, det, data, status, err, text):
    r = client.post("/v1/predict", content=data)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["type"] == err and text in body["error"]["message"]
    assert f"'<bytes {len(data)} B #0>'" in body["error"]["message"]  # names the input
    assert strip_timings(body) == _expected(det, data)  # the Prediction a Detector gives, error and all


def test_request_errors(client):
    r = client.post("/v1/predict", content=b"")
    assert r.status_code == 400 and "empty request body" in r.json()["error"]["message"]
    r = client.post("/v1/predict?thresholds=0.2", content=b"x")
    assert r.status_code == 400 and "thresholds" in r.json()["error"]["message"]
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def _related_parts(resp) -> list[bytes]:
    ctype = resp.headers["content-type"]
    assert ctype.startswith('multipart/related; type="application/dicom"'), ctype
    boundary = ctype.split("boundary=")[1].encode()
    chunks = resp.content.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    out = []
    for c in chunks[1:-1]:
        head, body = c.split(b"\r\n\r\n", 1)
        assert b"content-type: application/dicom" in head.lower()
        out.append(body[:-2])  # the CRLF before the next boundary
    return out


def _referenced_uids(ds) -> set[str]:
    found = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            found.add(str(elem.value))
    return found


def test_dicom_sr_of_a_dicom_source(client):
    import io

    import pydicom
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(io.BytesIO(encode(_image(256, 256, 7)[0], "dicom")))
    src.StudyInstanceUID, src.SeriesInstanceUID = generate_uid(), generate_uid()
    buf = io.BytesIO()
    src.save_as(buf, enforce_file_format=True)
    r = client.post("/v1/predict?dicom=sr", content=buf.getvalue())
    assert r.status_code == 200, r.text[:500]
    (part,) = _related_parts(r)
    sr = pydicom.dcmread(io.BytesIO(part))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == src.StudyInstanceUID
    assert src.SOPInstanceUID in _referenced_uids(sr)


def test_dicom_outputs_of_a_png_source_come_with_its_secondary_capture(client):
    import io

    import pydicom

    r = client.post("/v1/predict?dicom=sr,gsps,sc", content=encode(_image(200, 240, 8)[0], "png8"))
    assert r.status_code == 200, r.text[:500]
    sets = [pydicom.dcmread(io.BytesIO(p)) for p in _related_parts(r)]
    assert len(sets) == 4 and [d.Modality for d in sets[2:]] == ["PR", "SR"]
    source_sc = sets[0]
    assert all(d.StudyInstanceUID == source_sc.StudyInstanceUID for d in sets)
    assert source_sc.SOPInstanceUID in _referenced_uids(sets[3])


def test_dicom_query_errors(client):
    png = encode(_image(64, 64, 4)[0], "png8")
    r = client.post("/v1/predict?dicom=seg", content=png)
    assert r.status_code == 400 and "dicom='seg'" in r.json()["error"]["message"]
    r = client.post("/v1/predict?dicom=sr", files=[("file", ("a.png", png, "image/png"))])
    assert r.status_code == 400 and "one image per request" in r.json()["error"]["message"]
    r = client.post("/v1/predict?dicom=sr", content=png[:40])  # a failed image: its own 4xx JSON
    assert r.status_code == 422 and r.json()["error"]["type"] == "DecodeError"
    r = client.post("/v1/predict?dicom=sr", content=encode(_image(128, 128, 9)[0], "dicom"))  # no Study UID
    assert r.status_code == 422 and "no DICOM outputs" in r.json()["error"]["message"]


def _raw_request(port: int, head: bytes, body_parts: list[bytes], timeout: float = 10.0) -> bytes:
    """Send ``head`` and ``body_parts`` on a raw socket and read the answer (without sending more)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for p in body_parts:
            s.sendall(p)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _content_length(resp: bytes) -> int:
    head = resp.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_body_over_the_limit_is_refused_from_content_length_before_it_is_read(server):
    """Content-Length says 50 MB (limit 1 MiB): 413 comes back although not one body byte was sent."""
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 50000000\r\n\r\n")
    resp = _raw_request(server.port, head, [])
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    assert b"connection: close" in resp.lower()
    assert b"PayloadTooLarge" in resp and b"1048576 bytes" in resp


def test_chunked_body_over_the_limit_is_refused_at_the_limit(server):
    """No Content-Length (chunked): 413 as soon as 1 MiB is crossed, though the body never ends."""
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"\x00" * 65536
    parts = [b"%x\r\n" % len(chunk) + chunk + b"\r\n"] * 17  # 1.06 MiB, and no terminating 0-chunk
    resp = _raw_request(server.port, head, parts)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    assert b"chunked" in resp


def test_metrics_in_prometheus_text_format(client):
    from prometheus_client.parser import text_string_to_metric_families

    png = encode(_image(128, 128, 5)[0], "png8")
    assert client.post("/v1/predict", content=png).status_code == 200
    assert client.post("/v1/predict", content=b"not an image at all").status_code == 415
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("cxrkit_serve_requests_total", (("path", "/v1/predict"), ("status", "200")))] >= 1
    assert samples[("cxrkit_serve_requests_total", (("path", "/v1/predict"), ("status", "415")))] >= 1
    assert samples[("cxrkit_serve_errors_total", (("type", "UnsupportedFormatError"),))] >= 1
    assert ("cxrkit_serve_queue_depth", ()) in samples and ("cxrkit_serve_in_flight", ()) in samples
    assert samples[("cxrkit_serve_ready", ())] == 1.0
    assert fams["cxrkit_batch_size"].type == "histogram" and samples[("cxrkit_batch_size_count", ())] >= 1
    assert fams["cxrkit_stage_seconds"].type == "histogram"
    for stage in ("read", "queue", "load", "preprocess", "infer", "postprocess", "respond"):
        assert samples[("cxrkit_stage_seconds_count", (("stage", stage),))] >= 1, stage
    assert fams["cxrkit_serve_request_seconds"].type == "histogram"


def test_openapi_documents_predict(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/predict"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]


def test_json_is_the_clis_jsonl_content(client, det, tmp_path):
    """The service's JSON and `cxrkit predict`'s JSONL line for the same file hold the same content."""
    from cxrkit.cli import main

    data = encode(_image(200, 260, 6)[0], "png8")
    p = tmp_path / "x.png"
    p.write_bytes(data)
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(p), "--model", "cxr-probe", "--out", str(out)]) == 0
    line = strip_timings(json.loads(out.read_text().splitlines()[0]))
    got = strip_timings(client.post("/v1/predict", content=data).json())
    line.pop("source"), got.pop("source")
    assert got == line
    assert PROBE_LABELS[0] in got["findings"]


def test_dicom_outputs_answer_501_where_cxrkit_dicom_is_missing(monkeypatch):
    from cxrkit.serve import predict
    from cxrkit.serve.http import HTTPProblem

    assert predict._check_query({"dicom": "sr,gsps"}) == ("sr", "gsps")
    monkeypatch.setattr(predict, "dicom_outputs_available", lambda: False)
    with pytest.raises(HTTPProblem) as e:
        predict._check_query({"dicom": "sr"})
    assert e.value.status == 501 and "pip install 'cxrkit[dicom]'" in e.value.message
