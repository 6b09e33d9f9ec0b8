"""The node's receiving side in a process of its own: ``DicomNode(..., receiver="process")``.

Why: pynetdicom runs every association as two Python threads (its association and DUL reactors)
that poll their socket and queues every millisecond, reads each PDU 4 KiB per ``recv`` call and
decodes PDUs and DIMSE messages in Python. In the detector's process all of it competes for the
GIL with the BatchingDetector's own Python (worker threads, batching, pre/post-processing).
Measured on the 2-core CPU box (2026-11-30, 1024² 12-bit CR, four DCMTK storescu associations):
pynetdicom receiving alone, with no detector at all, ran at 53 img/s (decoding in memory) / 73
img/s (streamed to files) for 18-25 ms of CPU per image, more than the whole BatchingDetector path
(~13 ms; 66 img/s from four threads on 0.9 of a core), and the thread-receiver node spent 26-29
ms per image in its one process. Here the receiver's GIL is its own, the detector's process
keeps its ~13 ms per image, and the two use both cores; reading each PDU whole
(``_read_pdus_whole``) took the receiver from ~14 to ~9-10 ms per image.

    child (spawned, ``_serve``)                       parent (``ProcessReceiver`` in DicomNode)
    pynetdicom C-STORE SCP, C-ECHO                    reader thread: one message per C-STORE
      STORE_RECV_CHUNKED_DATASET: each data set        -> journal entry (received, then queued or
      streamed to a file in the spool folder              rejected with the child's typed error)
      same checks and DIMSE statuses as the thread    -> worker pool: read the spooled file, delete
      receiver (``node.check_store``)                     it, BatchingDetector, outputs, forwarders
      a slot of the node's bounded queue (a shared       (the slot is released when it is finished)
      semaphore), then the message, then 0x0000

Nothing is acknowledged before it is accounted for: the child writes the message to the pipe
(and counts it in a shared counter that ``DicomNode.wait_idle`` compares with what the parent
journaled) before it answers the peer. The child ignores SIGINT/SIGTERM (the parent drains and
stops it), and exits by itself if the parent dies. Not done: a node that is killed leaves the
instances it had accepted and not finished in the spool folder; nothing re-reads them at the next
start (they are in no journal line as done: the sender has to send them again).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cxrkit.errors import CxrkitError, DecodeError, DetectorClosedError, DicomNetworkError, InputError

__all__ = ["ProcessReceiver", "StoreMessage"]

log = logging.getLogger("cxrkit.dicom.node")

STOP_GRACE_S = 5.0  # what open associations get to finish their exchange when the node stops


@dataclass
class StoreMessage:
    """What the receiver process says about one C-STORE, before it answers the peer."""

    sop_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    path: str | None = None  # the spooled data set (queued)
    dimse_status: int | None = None  # the failure status it answered (rejected)
    error: CxrkitError | None = None


@dataclass
class _Config:
    ae_title: str
    host: str
    port: int
    allowed_calling_aets: tuple[str, ...]
    max_associations: int
    max_queue: int
    queue_timeout_s: float
    spool: str
    log_level: int


class ProcessReceiver:
    """Starts, feeds from and stops the receiver process (see the module docstring).

    ``on_store`` is called in the reader thread, in the order the child received the instances.
    """

    def __init__(self, cfg: _Config, slots: Any, on_store: Callable[[StoreMessage], None]) -> None:
        self.cfg = cfg
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with ORT / detector threads
        self.slots = slots
        self._on_store = on_store
        # plain shared memory and pipes, no multiprocessing Event / locked Value: a child killed while
        # it held their lock (waiting on an Event holds one) would hang the parent's next set()
        self._accepting = self._ctx.RawValue("b", 1)  # written by the parent (and the stopping child)
        self._sent = self._ctx.RawValue("q", 0)  # written by the child only
        self._stopping = False
        self._ctrl: Any = None
        self._got = 0
        self._got_lock = threading.Lock()
        self._proc: Any = None
        self._reader: threading.Thread | None = None
        self._conn: Any = None
        self.port: int = cfg.port

    @staticmethod
    def make_slots(max_queue: int) -> Any:
        return multiprocessing.get_context("spawn").BoundedSemaphore(max_queue)

    def start(self, timeout_s: float = 60.0) -> int:
        recv_conn, send_conn = self._ctx.Pipe(duplex=False)
        ctrl_recv, ctrl_send = self._ctx.Pipe(duplex=False)  # parent -> child: "stop" (or EOF)
        self._accepting.value = 1
        self._proc = self._ctx.Process(target=_serve, name="cxrkit-dicom-receiver", daemon=True,
                                       args=(self.cfg, send_conn, ctrl_recv, self.slots, self._accepting, self._sent))
        self._proc.start()
        send_conn.close()  # the child holds the only write end: EOF here when it ends
        ctrl_recv.close()
        self._ctrl = ctrl_send
        self._conn = recv_conn
        if not recv_conn.poll(timeout_s):
            self._kill()
            raise DicomNetworkError(f"the DICOM receiver process did not start within {timeout_s:g} s")
        try:
            kind, value = recv_conn.recv()
        except EOFError:
            self._proc.join(5)
            raise DicomNetworkError(
                f"the DICOM receiver process ended at start (exit code {self._proc.exitcode}; its error is on stderr). "
                "It is spawned and imports the main module: a script must start the node under "
                "'if __name__ == \"__main__\":' (or use DicomNode(..., receiver=\"thread\"))") from None
        if kind != "ready":
            self._proc.join(5)
            raise DicomNetworkError(f"the DICOM receiver could not listen on {self.cfg.host}:{self.cfg.port}: {value}")
        self.port = int(value)
        self._reader = threading.Thread(target=self._read, name="cxrkit-node-receiver-reader", daemon=True)
        self._reader.start()
        log.info("DICOM receiver process %d listening on %s:%d", self._proc.pid, self.cfg.host, self.port)
        return self.port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def pending(self) -> int:
        """C-STOREs the child accounted for (or is answering) that the parent has not journaled yet
        (0 once the pipe is closed and read to its end: a child killed mid-message sent nothing more)."""
        if self._reader is None or not self._reader.is_alive():
            return 0
        with self._got_lock:
            return int(self._sent.value) - self._got

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def stop_accepting(self) -> None:
        """New C-STOREs on open associations get 0xA700 from now on."""
        self._accepting.value = 0

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop listening; open associations get ``STOP_GRACE_S`` to finish, then are aborted;
        every message the child sent is handed to ``on_store`` before this returns."""
        if self._proc is None:
            return
        self.stop_accepting()
        self._stopping = True
        try:
            self._ctrl.send("stop")
        except OSError:  # the child is gone already
            pass
        self._proc.join(STOP_GRACE_S + timeout_s)
        if self._proc.is_alive():
            log.error("the DICOM receiver process %d did not stop in %g s: killed", self._proc.pid,
                      STOP_GRACE_S + timeout_s)
            self._kill()
        if self._reader is not None:
            self._reader.join(timeout_s)  # EOF once the child is gone and the pipe is read
        self._ctrl.close()
        self._proc = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, StoreMessage):
                try:
                    self._on_store(msg)
                except Exception:  # noqa: BLE001 - the reader must go on for the other instances
                    log.exception("the node failed to take %s from the receiver", msg.sop_instance_uid)
                finally:
                    with self._got_lock:
                        self._got += 1
        self._conn.close()
        if not self._stopping:  # not asked to stop: it crashed or was killed
            proc = self._proc
            if proc is not None:
                proc.join(5)
            log.error("the DICOM receiver process ended unexpectedly (exit code %s): the node receives nothing more; "
                      "restart it", proc.exitcode if proc is not None else "unknown")


# -- the child ---------------------------------------------------------------------------------


def _serve(cfg: _Config, conn: Any, ctrl: Any, slots: Any, accepting: Any, sent: Any) -> None:
    """The receiver process: a pynetdicom SCP until ``ctrl`` says stop (or closes) or the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C / SIGTERM to the group: the parent drains, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s (receiver): %(message)s")
    import tempfile

    from pydicom import Dataset, dcmread
    from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
    from pynetdicom.sop_class import Verification

    from cxrkit.dicom.node import (
        CANNOT_UNDERSTAND, OUT_OF_RESOURCES, READABLE_TRANSFER_SYNTAXES, SUCCESS, _peer, check_store,
    )

    # each data set is streamed to a temporary file, never decoded in memory by pynetdicom; in the
    # spool folder, a link (not a copy) keeps it once the handler returns
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = cfg.spool
    _read_pdus_whole()
    lock = threading.Lock()
    counter = [0]

    def emit(msg: StoreMessage) -> None:
        with lock:
            sent.value += 1
            conn.send(msg)

    def answer(status: int, err: CxrkitError) -> Dataset:
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = " ".join(str(getattr(err, "message", None) or err).split())[:64]  # LO
        return rsp

    def on_store(event: Any) -> Any:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        ctx_class = str(event.context.abstract_syntax)
        msg = StoreMessage(uid, ctx_class, _peer(event))

        def reject(status: int, err: CxrkitError) -> Any:
            msg.dimse_status, msg.error = status, err
            emit(msg)
            return answer(status, err)

        try:
            ds = dcmread(event.dataset_path)
            for _ in ds.iterall():  # every element decodes here, or the peer hears 0xC210
                pass
        except Exception as exc:  # noqa: BLE001 - a malformed data set is the peer's, answer it
            return reject(CANNOT_UNDERSTAND, DecodeError(uid, f"the data set cannot be decoded ({type(exc).__name__}: {exc})"))
        problem = check_store(ds, uid, ctx_class)
        if problem is not None:
            return reject(*problem)
        del ds
        if not accepting.value:
            return reject(OUT_OF_RESOURCES, DetectorClosedError("the DICOM node is stopping"))
        if not slots.acquire(timeout=cfg.queue_timeout_s):
            return reject(OUT_OF_RESOURCES, InputError(uid, (
                f"the node's queue stayed full ({cfg.max_queue} instances) for {cfg.queue_timeout_s:g} s; "
                "send it again later")))
        with lock:
            counter[0] += 1
            final = os.path.join(cfg.spool, f"{os.getpid()}-{counter[0]:09d}.dcm")
        try:
            try:
                os.link(event.dataset_path, final)
            except OSError:  # another file system, or no hard links: a copy
                shutil.copyfile(event.dataset_path, final)
        except OSError as exc:
            slots.release()
            return reject(OUT_OF_RESOURCES, InputError(uid, (
                f"the node could not keep the data set in its spool folder {cfg.spool} ({exc}); send it again later")))
        msg.path = final
        try:
            emit(msg)
        except (OSError, ValueError) as exc:  # the parent is gone: nobody would analyse it
            slots.release()
            Path(final).unlink(missing_ok=True)
            return answer(OUT_OF_RESOURCES, DetectorClosedError(f"the DICOM node is stopping ({exc})"))
        return SUCCESS

    def on_rejected(event: Any) -> None:
        log.warning("association from %s rejected", _peer(event))

    def on_aborted(event: Any) -> None:
        log.warning("association with %s aborted", _peer(event))

    ae = AE(ae_title=cfg.ae_title)
    ae.require_called_aet = True
    if cfg.allowed_calling_aets:
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, READABLE_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                (evt.EVT_REJECTED, on_rejected), (evt.EVT_ABORTED, on_aborted)]
    try:
        server = ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers)
    except Exception as exc:  # noqa: BLE001 - said to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        conn.close()
        return
    conn.send(("ready", int(server.server_address[1])))
    parent = multiprocessing.parent_process()
    while not ctrl.poll(0.5):  # "stop", or EOF: the parent closed its end
        if parent is not None and not parent.is_alive():
            log.error("the DICOM node's process is gone: the receiver stops")
            break
    accepting.value = 0
    server.shutdown()  # no new associations; open ones finish the exchange under way
    grace = time.monotonic() + STOP_GRACE_S
    while server.active_associations and time.monotonic() < grace:
        time.sleep(0.05)
    for assoc in server.active_associations:  # a peer that keeps an idle association open
        assoc.abort()
    conn.close()



def _read_pdus_whole() -> None:
    """In this (the receiver's own) process only: pynetdicom reads each PDU from its socket 4 KiB
    per ``recv`` call (``AssociationSocket.recv``), ~30 calls for each of the ~116 KiB PDUs DCMTK
    sends, and every call gives up the GIL and waits to take it back from the reactor threads that
    poll every millisecond. Reading a PDU into one buffer with ``recv_into`` (same contract: the
    bytes asked for, fewer if the peer closed; socket errors and timeouts raise as before) took the
    receiver from ~14 to ~9-10 ms of CPU per 1024² image with four associations (2026-11-30,
    /tmp experiment, three passes each)."""
    from pynetdicom import transport

    transport.AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]


def _recv_whole(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: ``nr_bytes`` from the socket into one buffer (fewer when the
    connection closes first)."""
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    n = 0
    while n < nr_bytes:
        k = self.socket.recv_into(view[n:], nr_bytes - n)
        if not k:  # the peer closed: what arrived so far, as pynetdicom's own recv returns
            view.release()
            del buf[n:]
            return buf
        n += k
    view.release()
    return buf
