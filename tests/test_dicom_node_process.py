"""The DICOM node with its receiving side in a process of its own (``receiver="process"``,
``cxrkit dicom-node --receiver process``), with DCMTK's storescu / echoscu as the outside peers:
nothing lost over concurrent associations, a bad instance spoils nothing else, the spool is
emptied, and shutdown (SIGTERM to the node or to its whole process group, or the node killed)
leaves no receiver process behind. The DIMSE statuses, bad associations and unfinished work are
tested for both receivers in test_dicom_node.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")

from cxrkit.dicom import DicomNode  # noqa: E402
from dicom_helpers import dcmtk, free_port, storescu_config  # noqa: E402
from test_dicom_node import CT, chest_dx, write_chest_series  # noqa: E402

BROKEN_J2K = "dicom/corrupt/chest-dx-966-broken-j2k.dcm"


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _receiver_of(pid: int) -> tuple[int, set[int]]:
    """The node's receiver process (multiprocessing's spawn child) and all its children (that one,
    and multiprocessing's resource tracker)."""
    kids = _children(pid)
    spawned = [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    assert len(spawned) == 1, kids
    return spawned[0], kids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended (its new parent reaps it)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def test_four_storescu_associations_nothing_lost_bad_instances_spoil_nothing(shared_data: Path, tmp_path: Path) -> None:
    dirs = [tmp_path / f"scu{k}" for k in range(4)]
    uids = [u for k, d in enumerate(dirs) for u in write_chest_series(d, 8, size=128, seed=k)]
    shutil.copy(shared_data / BROKEN_J2K, dirs[0] / "broken.dcm")  # reads as a header, its pixels do not decode
    broken_uid = str(pydicom.dcmread(dirs[0] / "broken.dcm", stop_before_pixels=True).SOPInstanceUID)
    ct = chest_dx(SOPClassUID=CT, Modality="CT")  # not a class the node reads: 0x0122 at once, on a 5th association
    (tmp_path / "ct").mkdir()  # (storescu stops sending after a refusal: alone in its folder)
    ct.save_as(tmp_path / "ct" / "ct.dcm", enforce_file_format=True)
    exe = dcmtk("storescu")
    cfg = storescu_config(tmp_path / "scu.cfg")
    spool = tmp_path / "spool"
    with DicomNode("cxr29-demo", host="127.0.0.1", port=0, outputs=(), max_queue=8, receiver="process",
                   spool_dir=spool, journal_path=tmp_path / "journal.jsonl") as node:
        procs = [subprocess.Popen([exe, *cfg, "+sd", "-aet", f"SCU{k}", "-aec", "CXRKIT", "127.0.0.1", str(node.port),
                                   str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for k, d in enumerate([*dirs, tmp_path / "ct"])]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert node.wait_idle(timeout=600)
        assert list(spool.iterdir()) == []  # every spooled data set read and deleted
    for p, out in zip(procs[:4], outs):
        assert p.returncode == 0, out
    assert "Refused: SOPClassNotSupported" in outs[4] or procs[4].returncode != 0, outs[4]
    entries = node.journal.entries()
    assert sorted(e.sop_instance_uid for e in entries) == sorted([*uids, broken_uid, str(ct.SOPInstanceUID)])
    by = {e.sop_instance_uid: e for e in entries}
    assert by[broken_uid].status == "failed" and by[broken_uid].error_type == "DecodeError"
    assert by[str(ct.SOPInstanceUID)].status == "rejected" and by[str(ct.SOPInstanceUID)].dimse_status == 0x0122
    assert {by[u].status for u in uids} == {"done"}  # the bad ones spoiled none of the others
    lines = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert len(lines) == len(entries)


def _start_cli(tmp_path: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "cxrkit.cli", "dicom-node", "--host", "127.0.0.1", "--port", str(port),
                             "--outputs", "none", "--receiver", "process", "--spool", str(tmp_path / "spool"),
                             "--journal", str(tmp_path / "j.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _wait_echo(proc: subprocess.Popen, port: int) -> None:
    echoscu = dcmtk("echoscu")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if subprocess.run([echoscu, "-aec", "CXRKIT", "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.3)
    raise AssertionError(proc.stderr.read() if proc.poll() is not None else "no echo answer")


@contextlib.contextmanager
def _node_cli(tmp_path: Path):
    """A `cxrkit dicom-node` process that answers C-ECHO: yields (process, port, receiver pid, the
    receiver's children); killed on the way out if it is still running."""
    port = free_port()
    proc = _start_cli(tmp_path, port)
    try:
        _wait_echo(proc, port)
        child, kids = _receiver_of(proc.pid)
        yield proc, port, child, kids
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_sigterm_to_the_group_drains_and_the_receiver_ends(tmp_path: Path) -> None:
    with _node_cli(tmp_path) as (proc, port, child, kids):
        uids = write_chest_series(tmp_path / "in", 6, size=128)
        r = subprocess.run([dcmtk("storescu"), "+sd", "-aec", "CXRKIT", "127.0.0.1", str(port), str(tmp_path / "in")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        os.killpg(proc.pid, signal.SIGTERM)  # as a service manager or a Ctrl-C does: the receiver too
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["unfinished"] == [] and report["journal"] == {"done": 6}
    lines = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert sorted(x["sop_instance_uid"] for x in lines) == sorted(uids)
    assert _wait_gone(child, 10), "the receiver process outlived the node"
    assert all(_wait_gone(k, 10) for k in kids)
    assert list((tmp_path / "spool").iterdir()) == []


def test_receiver_process_ends_when_the_node_is_killed(tmp_path: Path) -> None:
    with _node_cli(tmp_path) as (proc, _, child, kids):
        try:
            proc.kill()  # no drain, no stop: the receiver must not keep answering for a node that is gone
            proc.wait(30)
            assert _wait_gone(child, 10), "the receiver process outlived the node"
            assert all(_wait_gone(k, 10) for k in kids)
        finally:
            proc.communicate()


def test_cli_exits_3_when_its_receiver_process_dies(tmp_path: Path) -> None:
    with _node_cli(tmp_path) as (proc, _, child, _):
        os.kill(child, signal.SIGKILL)  # nothing can arrive any more: the node must not pretend to listen
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "receiver process ended unexpectedly" in err
