"""The DICOM node, tested with a real outside client and server (DCMTK's storescu and storescp)
and in-process with pynetdicom: DIMSE statuses, bad associations, accounting for every received
SOP Instance, forwarding failures, shutdown. Ports are chosen free at test time."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from pydicom.uid import generate_uid  # noqa: E402

from cxrkit.dicom import DicomNode  # noqa: E402
from cxrkit.results import Finding, Prediction  # noqa: E402
from dicom_helpers import assert_dciodvfy_clean, dcmtk, free_port, storescu_config  # noqa: E402
from test_fuzz_headers import make_dx  # noqa: E402

CR, DX, CT = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"


class SlowDetector:
    """Stands in for a Detector where a test needs control of time (queue full, shutdown):
    one finding per image, after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def predict(self, items, batch_size=None, return_heatmaps=False):
        time.sleep(self.delay_s)
        self.release.wait(30)
        out = []
        for i, img in enumerate(items):
            f = Finding(key="nodule", score=0.9, positive=True, threshold=0.5, boxes_xyxy=[[1, 1, 8, 8]],
                        box_scores=[0.9], points_xy=[[4, 4]])
            out.append(Prediction(source=getattr(img, "source", str(i)), index=i, findings={"nodule": f},
                                  image_size=img.image_size, meta=dict(img.meta), model="slow-fake"))
        return out


def chest_dx(rows: int = 64, cols: int = 64, **attrs) -> pydicom.Dataset:
    """A small frontal chest DX data set in a Study / Series of its own."""
    px = (np.add.outer(np.arange(rows), np.arange(cols)) * 16 % 4096).astype(np.uint16)
    base = dict(BodyPartExamined="CHEST", ViewPosition="PA", StudyInstanceUID=generate_uid(),
                SeriesInstanceUID=generate_uid(), PatientID="NODE-TEST", PatientName="Node^Test",
                SOPClassUID=DX)
    base.update(attrs)
    ds = make_dx(px, raw=True, **base)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def _scu(port: int, ae_title: str = "CXRKIT", calling: str = "TESTSCU", contexts=None):
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.requested_contexts = contexts or (
        [pynetdicom.build_context(c, ts) for c in (CR, DX, CT, SC) for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
        + [pynetdicom.build_context(Verification)])
    return ae.associate("127.0.0.1", port, ae_title=ae_title)


@pytest.fixture
def storescp(tmp_path: Path):
    """DCMTK's storescp on a free port (a process per association: the node forwards over several),
    storing into tmp_path/received: (port, folder)."""
    exe = dcmtk("storescp")
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    proc = subprocess.Popen([exe, "--fork", "-aet", "STORESCP", "-od", str(folder), "+xa", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    yield port, folder
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("receiver", ["thread", "process"])
def test_echo_and_bad_associations(receiver: str) -> None:
    with DicomNode(SlowDetector(), host="127.0.0.1", port=0, outputs=(), allowed_calling_aets=["TESTSCU"],
                   receiver=receiver) as node:
        assoc = _scu(node.port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        wrong_called = _scu(node.port, ae_title="NOT_CXRKIT")
        assert wrong_called.is_rejected
        wrong_calling = _scu(node.port, calling="INTRUDER")
        assert wrong_calling.is_rejected
        from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

        only_find = _scu(node.port, contexts=[pynetdicom.build_context(PatientRootQueryRetrieveInformationModelFind)])
        assert not only_find.is_established  # no presentation context accepted -> aborted by the SCU
    assert node.journal.entries() == []  # associations, not instances: nothing to account for


@pytest.mark.parametrize("receiver", ["thread", "process"])
def test_dimse_statuses_and_the_journal(tmp_path: Path, monkeypatch, receiver: str) -> None:
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # send a file's bytes unparsed
    slow = SlowDetector()
    with DicomNode(slow, host="127.0.0.1", port=0, outputs=(), max_queue=1, queue_timeout_s=0.3,
                   receiver=receiver, spool_dir=tmp_path / "spool") as node:
        assoc = _scu(node.port)
        ok = chest_dx()
        ct = chest_dx(SOPClassUID=CT, Modality="CT")
        no_pixels = chest_dx()
        del no_pixels.PixelData
        lateral = chest_dx(ViewPosition="LL")
        knee = chest_dx(BodyPartExamined="KNEE")
        sc_other = chest_dx(SOPClassUID=SC, Modality="XC")
        st = {name: assoc.send_c_store(ds).Status for name, ds in
              [("ok", ok), ("ct", ct), ("no_pixels", no_pixels), ("lateral", lateral), ("knee", knee),
               ("sc_other", sc_other)]}
        assert node.wait_idle(timeout=30)
        # malformed: a valid file meta, then bytes that are not a data set
        bad = tmp_path / "bad.dcm"
        meta = chest_dx()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, meta, enforce_file_format=True)
        raw = buf.getvalue()
        head = raw[: 132 + 12 + int.from_bytes(raw[140:144], "little")]  # preamble + DICM + group 2
        bad.write_bytes(head + b"\x08\x00\x16\x00ZZ\x04\x00abcd" + b"\x08\x00\x18\x00UI\x04\x001.23")  # VR "ZZ"
        st["malformed"] = assoc.send_c_store(bad).Status
        # queue full: one instance held in processing, the next waits queue_timeout_s for room
        slow.release.clear()
        first = chest_dx()
        st["held"] = assoc.send_c_store(first).Status
        st["full"] = assoc.send_c_store(chest_dx()).Status
        slow.release.set()
        assoc.release()
        assert node.wait_idle(timeout=30)
    assert st == {"ok": 0x0000, "ct": 0x0122, "no_pixels": 0xA900, "lateral": 0x0000, "knee": 0x0000,
                  "sc_other": 0x0122, "malformed": 0xC210, "held": 0x0000, "full": 0xA700}
    entries = node.journal.entries()
    assert len(entries) == 9 and all(e.status in ("done", "refused", "rejected") for e in entries)
    by = {e.sop_instance_uid: e for e in entries}
    assert by[ok.SOPInstanceUID].status == "done" and by[first.SOPInstanceUID].status == "done"
    assert by[ct.SOPInstanceUID].error_type == "UnsupportedFormatError" and by[ct.SOPInstanceUID].dimse_status == 0x0122
    assert by[lateral.SOPInstanceUID].status == "refused" and by[lateral.SOPInstanceUID].error_type == "UnsuitableImageError"
    assert "BodyPartExamined is KNEE" in by[knee.SOPInstanceUID].error
    assert by[no_pixels.SOPInstanceUID].error_type == "InputError"
    malformed = [e for e in entries if e.dimse_status == 0xC210]
    assert len(malformed) == 1 and malformed[0].error_type == "DecodeError"
    full = [e for e in entries if e.dimse_status == 0xA700]
    assert len(full) == 1 and "queue stayed full" in full[0].error
    if receiver == "process":  # every spooled data set was deleted once read
        assert list((tmp_path / "spool").iterdir()) == []


def test_forwarding_failure_is_journaled_not_dropped(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    dead = f"127.0.0.1:{free_port()}:NOBODY"  # nothing listens there
    with DicomNode(SlowDetector(), host="127.0.0.1", port=0, outputs=("sr",), forward=[dead], forward_retries=0,
                   journal_path=journal) as node:
        assoc = _scu(node.port)
        ds = chest_dx()
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert node.wait_idle(timeout=60)
    (e,) = node.journal.entries()
    assert e.status == "failed" and e.error_type == "DicomNetworkError" and e.forwarded == {"NOBODY@127.0.0.1:" + dead.split(":")[1]: "failed"}
    assert len(e.outputs) == 1  # made, but not delivered: said so
    import json

    line = json.loads(journal.read_text().splitlines()[0])
    assert line["sop_instance_uid"] == ds.SOPInstanceUID and line["status"] == "failed"


@pytest.mark.parametrize("receiver", ["thread", "process"])
def test_stop_reports_unfinished_work(receiver: str) -> None:
    slow = SlowDetector()
    slow.release.clear()  # the detector never finishes on its own
    node = DicomNode(slow, host="127.0.0.1", port=0, outputs=(), max_queue=8, receiver=receiver).start()
    assoc = _scu(node.port)
    sent = [chest_dx() for _ in range(3)]
    assert [assoc.send_c_store(ds).Status for ds in sent] == [0, 0, 0]
    assoc.release()
    report = node.stop(drain=True, timeout=1.0)
    slow.release.set()
    assert sorted(report.unfinished) == sorted(ds.SOPInstanceUID for ds in sent) and not report.clean
    assert {e.status for e in node.journal.entries()} == {"not_processed"}
    assert all(e.error_type == "DetectorClosedError" for e in node.journal.entries())
    again = _scu(node.port)
    assert not again.is_established  # no longer listening


SENT_FILES = [  # every encoding in ../shared/data, the corrupt J2K included (the 1955x1841 RG1 set: slow test)
    "dicom/chest-dx-966-j2k.dcm", "dicom/corrupt/chest-dx-966-broken-j2k.dcm", "dicom/dx-tiny-monochrome1.dcm",
    "dicom/codecs/JLSL/RG2_JLSL.dcm", "dicom/codecs/JLSL/RG3_JLSL.dcm", "dicom/codecs/JPLL/RG2_JPLL.dcm",
    "dicom/codecs/JPLL/RG3_JPLL.dcm", "dicom/codecs/JPLY/RG2_JPLY.dcm", "dicom/codecs/JPLY/RG3_JPLY.dcm",
    "dicom/codecs/RLE/RG2_RLE.dcm", "dicom/codecs/RLE/RG3_RLE.dcm",
    "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "torchxrayvision/Fake_MONOHR1.dcm",
]


def _run_storescu(port: int, files: list[str], cfg: Path, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    exe = dcmtk("storescu")
    return subprocess.run([exe, *storescu_config(cfg), "-aet", calling, "-aec", "CXRKIT", "127.0.0.1", str(port), *files],
                          capture_output=True, text=True, timeout=600)


def _received(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]


def _check_storescu_node_storescp(shared: Path, files: list[str], storescp, tmp_path: Path, strict: bool) -> None:
    scp_port, received = storescp
    paths = [str(shared / f) for f in files]
    # (some UIDs repeat: the corrupt file is the J2K one, broken, and Fake_MONOHR1 the other CR)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    with DicomNode("cxr29-demo", host="127.0.0.1", port=0, forward=[f"127.0.0.1:{scp_port}:STORESCP"],
                   strict=strict, journal_path=tmp_path / "journal.jsonl") as node:
        r = _run_storescu(node.port, paths, tmp_path / "scu.cfg")
        assert r.returncode == 0, r.stdout + r.stderr
        assert node.wait_idle(timeout=600)
        stats = node.stats()
    entries = node.journal.entries()  # one per C-STORE, in the order storescu sent them
    assert [e.sop_instance_uid for e in entries] == uids and stats["open"] == 0  # every instance accounted for
    for e, path in zip(entries, paths):
        if "broken" in path:
            assert e.status == "failed" and e.error_type == "DecodeError", e
        elif strict and ("/codecs/" in path):
            assert e.status == "refused" and e.error_type == "UnsuitableImageError", e
        else:
            assert e.status == "done" and len(e.outputs) == 3, e
    outputs = _received(received)
    done = [e for e in entries if e.status == "done"]
    assert len(outputs) == 3 * len(done)
    by_uid = {str(o.SOPInstanceUID): o for o in outputs}
    for e, path in zip(entries, paths):
        if e.status != "done":
            continue
        objs = [by_uid[u] for u in e.outputs]
        assert sorted(o.Modality for o in objs) == ["OT", "PR", "SR"]
        src = pydicom.dcmread(path, stop_before_pixels=True)
        for o in objs:
            assert o.StudyInstanceUID == src.StudyInstanceUID
        sc = [o for o in objs if o.Modality == "OT"][0]
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == e.sop_instance_uid
    for p in sorted(received.iterdir())[:9]:
        assert_dciodvfy_clean(p)


def test_storescu_to_node_to_storescp(shared_data: Path, storescp, tmp_path: Path) -> None:
    _check_storescu_node_storescp(shared_data, SENT_FILES, storescp, tmp_path, strict=True)


@pytest.mark.slow
def test_storescu_every_shared_dicom_not_strict(shared_data: Path, storescp, tmp_path: Path) -> None:
    files = sorted(str(p.relative_to(shared_data)) for p in shared_data.rglob("*.dcm"))
    _check_storescu_node_storescp(shared_data, files, storescp, tmp_path, strict=False)


def write_chest_series(folder: Path, n: int, size: int = 256, seed: int = 0) -> list[str]:
    """``n`` small CR chest radiographs (a real NIH image, shifted and with noise), unique UIDs."""
    from PIL import Image

    from dicom_helpers import DATA

    src = DATA / "torchxrayvision" / "00000001_000.png"
    base = np.asarray(Image.open(src).convert("L").resize((size, size)), np.float32) * 16
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    uids = []
    study = generate_uid()
    for i in range(n):
        px = np.clip(np.roll(base, rng.integers(-8, 8), axis=1) + rng.normal(0, 20, base.shape), 0, 4095).astype(np.uint16)
        ds = make_dx(px, raw=True, SOPClassUID=CR, Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA",
                     StudyInstanceUID=study, SeriesInstanceUID=generate_uid(), PatientID=f"P{i // 4}",
                     InstanceNumber=i + 1)
        ds.file_meta.MediaStorageSOPClassUID = CR
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


@pytest.mark.slow
@pytest.mark.parametrize("receiver", ["thread", "process"])
def test_200_images_from_4_concurrent_storescu_associations(shared_data: Path, storescp, tmp_path: Path,
                                                            receiver: str) -> None:
    scp_port, received = storescp
    dirs = [tmp_path / f"scu{k}" for k in range(4)]
    uids = [u for k, d in enumerate(dirs) for u in write_chest_series(d, 50, seed=k)]
    assert len(set(uids)) == 200
    exe = dcmtk("storescu")
    cfg = storescu_config(tmp_path / "scu.cfg")
    with DicomNode("cxr29-demo", host="127.0.0.1", port=0, forward=[f"127.0.0.1:{scp_port}:STORESCP"],
                   max_queue=32, receiver=receiver) as node:
        procs = [subprocess.Popen([exe, *cfg, "+sd", "-aet", f"SCU{k}", "-aec", "CXRKIT", "127.0.0.1", str(node.port),
                                   str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for k, d in enumerate(dirs)]
        for p in procs:
            out, _ = p.communicate(timeout=1200)
            assert p.returncode == 0, out
        assert node.wait_idle(timeout=1200)
        stats = node.stats()
    entries = node.journal.entries()
    assert sorted(e.sop_instance_uid for e in entries) == sorted(uids)  # nothing lost, nothing twice
    assert {e.status for e in entries} == {"done"}, stats
    assert len(list(received.iterdir())) == 600


def test_cli_dicom_node_echo_and_sigterm(tmp_path: Path) -> None:
    echoscu = dcmtk("echoscu")
    port = free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "cxrkit.cli", "dicom-node", "--host", "127.0.0.1", "--port", str(port),
                             "--outputs", "none", "--journal", str(tmp_path / "j.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            r = subprocess.run([echoscu, "-aec", "CXRKIT", "127.0.0.1", str(port)], capture_output=True, text=True)
            if r.returncode == 0:
                ok = True
                break
            time.sleep(0.5)
        assert ok, proc.stderr.read() if proc.poll() is not None else "no echo answer"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert '"unfinished": []' in out and "listening on 127.0.0.1" in err
