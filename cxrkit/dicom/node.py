"""The DICOM node: C-STORE in, one BatchingDetector, SR / GSPS / SC out by C-STORE.

    node = DicomNode("cxr29-demo", ae_title="CXRKIT", port=11112, forward=["pacs:104:PACS"]).start()
    ...                              # a modality or PACS sends chest X-rays to CXRKIT@host:11112
    report = node.stop()             # finishes (or reports) the queued work

Per received instance (pynetdicom association threads -> a worker pool -> the forwarders):

1. The C-STORE handler checks what it can answer at once, with the DIMSE status the standard
   gives: a data set that does not decode 0xC210 (cannot understand); a SOP Class the node does
   not read 0x0122 (SOP Class not supported; it reads CR, DX for presentation / processing, and
   Secondary Captures whose Modality is CR/DX); an SOP Class or Instance UID that contradicts
   the request, or no pixel data / Rows / Columns 0xA900 (does not match SOP Class); no room in
   the bounded queue within ``queue_timeout_s``, or the node stopping, 0xA700 (out of
   resources). Otherwise it answers 0x0000 and queues the instance.
2. A worker applies the header quality gate (``strict``: a lateral or non-chest image is refused
   before its decode), reads the image once (cxrkit.io), submits it to the BatchingDetector, makes
   the outputs (cxrkit.dicom.make_outputs, reusing the decoded image) and hands them to the
   forwarders (and/or writes them to ``out_dir``).
3. Every received SOP Instance ends in the journal (``node.journal``; JSON lines in
   ``journal_path``) as done (with its output UIDs and forwarding results), failed, refused or
   rejected, with the typed error; each end is logged. Nothing is dropped silently: if the node
   stops before an instance is finished, it is journaled as not processed, and ``stop`` says so.

With ``receiver="process"`` (the default) the receiving side (pynetdicom, the checks of step 1, the DIMSE
statuses) runs in a process of its own that spools each data set to a file (``spool_dir``) and
hands it to this process for steps 2-3; see cxrkit.dicom.receiver for why and how.

The node never processes its own outputs (Manufacturer "cxrkit" + a DERIVED image), so a PACS
that routes everything back to it does not start a loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from cxrkit.dicom.forward import Destination, Forwarder
from cxrkit.dicom.journal import Journal, JournalEntry
from cxrkit.errors import (
    CxrkitError, DecodeError, DetectorClosedError, DicomNetworkError, InputError, UnsupportedFormatError,
)

__all__ = ["DicomNode", "Destination", "ShutdownReport", "PROCESSED_SOP_CLASSES", "RECEIVERS", "check_store"]

log = logging.getLogger(__name__)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PROCESSED_SOP_CLASSES = frozenset({CR, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE})
OUTPUT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.11.1", SECONDARY_CAPTURE)

# what cxrkit.io decodes (pydicom's handlers): pynetdicom copies every supported context for each
# association, so listing only these (16, not its 35) makes an association ~2x cheaper to set up
READABLE_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",  # uncompressed, deflated
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # JPEG
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",  # JPEG-LS
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",  # JPEG 2000, HTJ2K
    "1.2.840.10008.1.2.5",  # RLE
]

RECEIVERS = ("thread", "process")

SUCCESS, SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = (
    0x0000, 0x0122, 0xA700, 0xA900, 0xC210)


@dataclasses.dataclass
class ShutdownReport:
    """What ``stop`` found: instances finished (done / failed / refused / rejected) and those the
    node stopped before finishing (journaled as not processed), by SOP Instance UID."""

    finished: int
    unfinished: list[str]
    forward_pending: int

    @property
    def clean(self) -> bool:
        return not self.unfinished and not self.forward_pending


class DicomNode:
    """A C-STORE SCP running chest X-rays through one BatchingDetector (see the module docstring).

    detector: a model name / path (a BatchingDetector is made with ``max_batch``, ``max_delay_ms``
        and ``detector_kwargs``) or a ready Detector / BatchingDetector (the caller's to close).
    ae_title / host / port: where it listens (port 0: a free port, see ``node.port``).
    forward: destinations ("HOST:PORT:AE" or ``Destination``) that receive every output.
    outputs: which of "sr", "gsps", "sc" to make (empty: only the journal).
    out_dir: also write the outputs there (<Modality>_<SOPInstanceUID>.dcm).
    strict: refuse lateral / non-chest / colour images by their header (journaled, not analysed).
    max_queue: instances received and not yet finished (the bound on memory); queue_timeout_s:
        how long a C-STORE waits for room before it is answered 0xA700.
    allowed_calling_aets: if given, only these calling AE titles may associate.
    forward_associations: parallel associations per destination (a store waits for its answer).
    receiver: "process" (pynetdicom in a spawned process of its own, data sets spooled to files in
        ``spool_dir``, default a temporary folder removed by ``stop``; start the node under
        ``if __name__ == "__main__":`` in a script, as the child imports the main module) or
        "thread" (pynetdicom in this process); same checks, statuses and journal either way.
        "process" is faster with one and with four associations (benchmarks/RESULTS.md).
    """

    def __init__(self, detector: Any = "cxr29-demo", *, ae_title: str = "CXRKIT", host: str = "0.0.0.0",
                 port: int = 11112, forward: Sequence["str | Destination"] = (),
                 outputs: Sequence[str] = ("sr", "gsps", "sc"), out_dir: "str | os.PathLike[str] | None" = None,
                 strict: bool = True, max_queue: int = 64, queue_timeout_s: float = 30.0, max_batch: int = 16,
                 max_delay_ms: float = 20.0, workers: int | None = None, journal_path: "str | os.PathLike[str] | None" = None,
                 uid_prefix: str | None = None, sc_max_side: int = 2048, allowed_calling_aets: Sequence[str] = (),
                 max_associations: int = 16, forward_retries: int = 3, forward_associations: int = 4,
                 receiver: str = "process", spool_dir: "str | os.PathLike[str] | None" = None,
                 **detector_kwargs: Any) -> None:
        from cxrkit.batching import BatchingDetector
        from cxrkit.dicom.outputs import OUTPUT_KINDS, require

        require("pynetdicom")
        if outputs:
            require("highdicom")

        bad = [k for k in outputs if k not in OUTPUT_KINDS]
        if bad:
            raise ValueError(f"unknown output kind(s) {bad}; expected any of {OUTPUT_KINDS}")
        if not 1 <= len(ae_title) <= 16 or not ae_title.isascii():
            raise ValueError(f"AE title {ae_title!r} must be 1-16 ASCII characters")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if receiver not in RECEIVERS:
            raise ValueError(f"receiver must be one of {RECEIVERS}, got {receiver!r}")
        self.receiver = receiver
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.ae_title = ae_title
        self.host, self._port = host, int(port)
        self.destinations = [Destination.parse(d) for d in forward]
        self.outputs = tuple(outputs)
        self.out_dir = Path(out_dir) if out_dir else None
        self.strict = bool(strict)
        self.max_queue = int(max_queue)
        self.queue_timeout_s = float(queue_timeout_s)
        self.uid_prefix = uid_prefix
        self.sc_max_side = int(sc_max_side)
        self.allowed_calling_aets = tuple(allowed_calling_aets)
        self.max_associations = int(max_associations)
        self.forward_retries = int(forward_retries)
        self.forward_associations = int(forward_associations)
        if isinstance(detector, BatchingDetector):
            self._bd, self._owns_bd = detector, False
        elif callable(getattr(detector, "predict", None)):
            self._bd, self._owns_bd = BatchingDetector(detector, max_batch=max_batch, max_delay_ms=max_delay_ms,
                                                      max_queue=max(4 * max_batch, max_queue)), True
        else:
            self._bd, self._owns_bd = BatchingDetector(detector, max_batch=max_batch, max_delay_ms=max_delay_ms,
                                                      max_queue=max(4 * max_batch, max_queue), **detector_kwargs), True
        inner = self._bd.detector
        self.limits = getattr(inner, "limits", None)
        self.model = getattr(inner, "model", None)
        self.journal = Journal(journal_path)
        if receiver == "process":  # taken by the receiver process, given back here when an instance is finished
            from cxrkit.dicom.receiver import ProcessReceiver

            self._slots: Any = ProcessReceiver.make_slots(self.max_queue)
        else:
            self._slots = threading.BoundedSemaphore(self.max_queue)
        self._receiver: Any = None
        self._own_spool: Path | None = None
        self._workers = ThreadPoolExecutor(workers or max(4, int(max_batch) + 2), thread_name_prefix="cxrkit-node")
        self._forwarders: list[Forwarder] = []
        self._accepting = False
        self._server: Any = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port it listens on (the one chosen when constructed with port 0)."""
        if self._receiver is not None:
            return int(self._receiver.port)
        return int(self._server.server_address[1]) if self._server is not None else self._port

    def start(self) -> "DicomNode":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        if self._server is not None:
            return self
        self._forwarders = [Forwarder(d, self.ae_title, OUTPUT_SOP_CLASSES, retries=self.forward_retries,
                                      associations=self.forward_associations) for d in self.destinations]
        if self.receiver == "process":
            return self._start_process_receiver()
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # an association addressed to another AE title is rejected
        if self.allowed_calling_aets:
            ae.require_calling_aet = list(self.allowed_calling_aets)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = 0  # no limit: peers send large PDUs, fewer Python round trips
        for cx in AllStoragePresentationContexts:  # any storage class may arrive; unsupported ones get 0x0122
            ae.add_supported_context(cx.abstract_syntax, READABLE_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ABORTED, self._on_aborted)]
        self._ae = ae
        self._accepting = True
        self._server = ae.start_server((self.host, self._port), block=False, evt_handlers=handlers)
        log.info("DICOM node %s listening on %s:%d; forwarding %s to %s", self.ae_title, self.host, self.port,
                 ",".join(self.outputs) or "nothing", ", ".join(map(str, self.destinations)) or "nobody")
        return self

    def _start_process_receiver(self) -> "DicomNode":
        import tempfile

        from cxrkit.dicom.receiver import ProcessReceiver, _Config

        if self.spool_dir is None:
            self._own_spool = Path(tempfile.mkdtemp(prefix="cxrkit-node-spool-"))
            spool = self._own_spool
        else:
            spool = self.spool_dir
            spool.mkdir(parents=True, exist_ok=True)
        cfg = _Config(ae_title=self.ae_title, host=self.host, port=self._port,
                      allowed_calling_aets=self.allowed_calling_aets, max_associations=self.max_associations,
                      max_queue=self.max_queue, queue_timeout_s=self.queue_timeout_s, spool=str(spool),
                      log_level=logging.getLogger("pynetdicom").getEffectiveLevel())
        receiver = ProcessReceiver(cfg, self._slots, self._on_spooled)
        try:
            receiver.start()
        except BaseException:
            self._remove_own_spool()
            raise
        self._receiver = receiver
        self._server = receiver  # "started"
        self._accepting = True
        log.info("DICOM node %s listening on %s:%d (receiver process %s); forwarding %s to %s", self.ae_title,
                 self.host, self.port, receiver.pid, ",".join(self.outputs) or "nothing",
                 ", ".join(map(str, self.destinations)) or "nobody")
        return self

    def _remove_own_spool(self) -> None:
        if self._own_spool is not None:
            import shutil

            shutil.rmtree(self._own_spool, ignore_errors=True)
            self._own_spool = None

    def is_listening(self) -> bool:
        """True while started and not stopped, and (receiver "process") its receiver process lives."""
        if self._receiver is not None:
            return self._server is not None and self._receiver.alive()
        return self._server is not None

    def serve_forever(self, poll_s: float = 0.5) -> None:
        """Block until ``stop`` is called from another thread (or a signal handler)."""
        while self._server is not None and self._accepting and self.is_listening():
            time.sleep(poll_s)

    def wait_idle(self, timeout: float | None = None, quiet_s: float = 0.0) -> bool:
        """True once every instance received so far is finished (and ``quiet_s`` passed with no new
        one); False at ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.journal.open_count() == 0 and self._forward_pending() == 0 and self._receiver_pending() == 0:
                last = self.journal.last_received()
                if last is None or time.monotonic() - last >= quiet_s:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, drain: bool = True, timeout: float | None = 120.0) -> ShutdownReport:
        """Stop listening (new C-STOREs on open associations get 0xA700), then finish the queued
        work (``drain``) within ``timeout`` seconds; whatever is left is journaled as not
        processed (``DetectorClosedError``) and listed in the report. Idempotent."""
        t0 = time.monotonic()
        left = (lambda: None if timeout is None else max(0.0, timeout - (time.monotonic() - t0)))
        with self._lock:
            self._accepting = False
            server, self._server = self._server, None
        if server is not None and server is self._receiver:  # the child stops listening, lets open
            self._receiver.stop(timeout_s=min(30.0, left() if left() is not None else 30.0))  # associations end
        elif server is not None:
            server.shutdown()  # no new associations; open ones finish the exchange under way
            grace = time.monotonic() + min(5.0, left() if left() is not None else 5.0)
            while server.active_associations and time.monotonic() < grace:
                time.sleep(0.05)
            for assoc in server.active_associations:  # a peer that keeps an idle association open
                assoc.abort()
        if drain:
            self.wait_idle(timeout=left())
        unfinished = self.journal.close_open(DetectorClosedError(
            "the DICOM node stopped before this instance was finished; send it again"))
        # with work left (a stuck detector, a timeout) nobody waits for the workers: they end as
        # the BatchingDetector below fails what is queued; what they finish late is not journaled twice
        self._workers.shutdown(wait=drain and not unfinished, cancel_futures=True)
        pending = 0
        for fw in self._forwarders:
            pending += fw.pending()
            fw.close(timeout=left())
        if self._owns_bd:
            self._bd.close(drain=False, timeout=left())
        self._remove_own_spool()  # what is left there was journaled as not processed
        report = ShutdownReport(finished=self.journal.finished_count(), unfinished=unfinished,
                                forward_pending=pending)
        if unfinished:
            log.error("DICOM node stopped with %d instance(s) not processed: %s", len(unfinished),
                      ", ".join(unfinished[:20]) + (" ..." if len(unfinished) > 20 else ""))
        log.info("DICOM node %s stopped: %s", self.ae_title, self.journal.counts())
        self.journal.close()
        return report

    def __enter__(self) -> "DicomNode":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counts by journal status, queue depth, and images/s from the first to the last
        finished instance."""
        counts = self.journal.counts()
        first, last = self.journal.time_span()
        n_done = counts.get("done", 0)
        rate = n_done / (last - first) if first is not None and last and last > first and n_done else 0.0
        return {**counts, "open": self.journal.open_count(), "detector_queue": self._bd.queue_depth(),
                "forward_pending": self._forward_pending(), "images_per_s": rate}

    def _forward_pending(self) -> int:
        return sum(fw.pending() for fw in self._forwarders)

    def _receiver_pending(self) -> int:
        return self._receiver.pending() if self._receiver is not None else 0

    # -- DIMSE handlers (association threads) --------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_rejected(self, event: Any) -> None:
        log.warning("association from %s rejected", _peer(event))

    def _on_aborted(self, event: Any) -> None:
        log.warning("association with %s aborted", _peer(event))

    def _on_store(self, event: Any) -> Any:
        req = event.request
        uid = str(req.AffectedSOPInstanceUID or "")
        ctx_class = str(event.context.abstract_syntax)
        entry = self.journal.receive(uid, ctx_class, _peer(event))
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            for _ in ds.iterall():  # pydicom parses lazily: make every element decode now, not in a worker
                pass
        except Exception as exc:  # noqa: BLE001 - a malformed data set is the peer's, answer it
            return self._reject(entry, CANNOT_UNDERSTAND, DecodeError(
                uid, f"the data set cannot be decoded ({type(exc).__name__}: {exc})"))
        problem = self._check(ds, uid, ctx_class)
        if problem is not None:
            return self._reject(entry, *problem)
        if not self._accepting:
            return self._reject(entry, OUT_OF_RESOURCES, DetectorClosedError("the DICOM node is stopping"))
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            return self._reject(entry, OUT_OF_RESOURCES, InputError(uid, (
                f"the node's queue stayed full ({self.max_queue} instances) for {self.queue_timeout_s:g} s; "
                "send it again later")))
        try:
            self._workers.submit(self._process, ds, entry)
        except RuntimeError as exc:  # the pool was shut down (stop raced this store)
            self._slots.release()
            return self._reject(entry, OUT_OF_RESOURCES, DetectorClosedError(f"the DICOM node is stopping: {exc}"))
        self.journal.update(entry, status="queued")
        return SUCCESS

    def _check(self, ds: Any, uid: str, ctx_class: str) -> "tuple[int, CxrkitError] | None":
        return check_store(ds, uid, ctx_class)

    # -- the receiver process's instances (its reader thread) ------------------------------------
    def _on_spooled(self, msg: Any) -> None:
        """One C-STORE the receiver process answered: journal it, and queue it if it was accepted
        (its slot is already taken)."""
        entry = self.journal.receive(msg.sop_instance_uid, msg.sop_class_uid, msg.calling_ae)
        if msg.path is None:
            self.journal.finish(entry, "rejected", error=msg.error, dimse_status=msg.dimse_status)
            return
        try:
            self._workers.submit(self._process_spooled, msg.path, entry)
        except RuntimeError as exc:  # the pool was shut down: the peer heard 0x0000, so say it was not processed
            self._slots.release()
            Path(msg.path).unlink(missing_ok=True)
            self.journal.finish(entry, "not_processed", error=DetectorClosedError(f"the DICOM node is stopping: {exc}"))
            return
        self.journal.update(entry, status="queued")

    def _process_spooled(self, path: str, entry: JournalEntry) -> None:
        from pydicom import dcmread

        try:
            ds = dcmread(path)  # every element but deferred ones is in memory: the file can go
        except Exception as exc:  # noqa: BLE001 - it was read once by the receiver: a disk problem
            self._slots.release()
            self.journal.finish(entry, "failed", error=DecodeError(entry.sop_instance_uid, (
                f"the spooled data set {path} cannot be read back ({type(exc).__name__}: {exc})")))
            return
        finally:
            Path(path).unlink(missing_ok=True)
        self._process(ds, entry)

    def _reject(self, entry: JournalEntry, status: int, err: CxrkitError) -> Any:
        from pydicom import Dataset

        self.journal.finish(entry, "rejected", error=err, dimse_status=status)
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = " ".join(str(getattr(err, "message", None) or err).split())[:64]  # LO
        return rsp

    # -- work (worker threads) -----------------------------------------------------------------
    def _process(self, ds: Any, entry: JournalEntry) -> None:
        forwarded = False
        try:
            forwarded = self._analyse(ds, entry)
        except Exception as exc:  # noqa: BLE001 - every instance ends in the journal, whatever happened
            err = exc if isinstance(exc, CxrkitError) else DecodeError(entry.sop_instance_uid, (
                f"unexpected {type(exc).__name__}: {exc}"))
            if not isinstance(exc, CxrkitError):
                log.exception("unexpected error on %s", entry.sop_instance_uid)
            self.journal.finish(entry, "failed", error=err)
        finally:
            if not forwarded:
                self._slots.release()

    def _analyse(self, ds: Any, entry: JournalEntry) -> bool:
        """True when the instance was handed to the forwarders (which finish it)."""
        from cxrkit.config import Limits
        from cxrkit.dicom.outputs import make_outputs
        from cxrkit.errors import UnsuitableImageError
        from cxrkit.io import load_item

        self.journal.update(entry, status="processing")
        source = f"{entry.sop_instance_uid} from {entry.calling_ae}"
        try:
            img = load_item(ds, 0, limits=self.limits or Limits(), strict=self.strict)
        except InputError as exc:  # named after the instance and its sender, not '<Dataset 1.2... #0>'
            named = type(exc)(source, exc.message)
            named.__cause__ = exc
            self.journal.finish(entry, "refused" if isinstance(exc, UnsuitableImageError) else "failed", error=named)
            return False
        img = dataclasses.replace(img, source=source)
        pred = self._bd.submit(img, block=True).result()
        if pred.error is not None:
            self.journal.finish(entry, "failed", error=pred.error)
            return False
        entry.warnings = list(pred.warnings)
        if not self.outputs:
            self.journal.finish(entry, "done")
            return False
        outs = make_outputs(pred, ds, kinds=self.outputs, image=img, model=self.model, uid_prefix=self.uid_prefix,
                            sc_max_side=self.sc_max_side)
        datasets = outs.datasets()
        entry.outputs = [str(d.SOPInstanceUID) for d in datasets]
        entry.warnings += outs.warnings
        if self.out_dir is not None:
            outs.save(self.out_dir)
        if not self._forwarders:
            self.journal.finish(entry, "done")
            return False
        remaining = [len(self._forwarders)]
        errors: dict[str, list[str]] = {}
        lock = threading.Lock()

        def done(dest: Destination, results: list[DicomNetworkError | None]) -> None:
            with lock:
                bad = [str(e) for e in results if e is not None]
                if bad:
                    errors[str(dest)] = bad
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                entry.forwarded = {str(d): ("failed" if str(d) in errors else "stored") for d in self.destinations}
                if errors:
                    self.journal.finish(entry, "failed", error=DicomNetworkError(
                        "; ".join(m for ms in errors.values() for m in ms)))
                else:
                    self.journal.finish(entry, "done")
                self._slots.release()

        for fw in self._forwarders:
            fw.submit(datasets, lambda results, d=fw.dest: done(d, results))
        return True


def check_store(ds: Any, uid: str, ctx_class: str) -> "tuple[int, CxrkitError] | None":
    """What a C-STORE of ``ds`` (request: ``uid`` / ``ctx_class``) must be answered at once, as
    (DIMSE status, typed error), or None when the node takes it (both receivers use this)."""
    sop_class = str(ds.get("SOPClassUID") or "")
    if str(ds.get("SOPInstanceUID") or "") != uid or sop_class != ctx_class:
        return DOES_NOT_MATCH, InputError(uid, (
            f"the data set says SOP Class {sop_class or 'none'} / Instance {ds.get('SOPInstanceUID') or 'none'}, "
            f"the request {ctx_class} / {uid}"))
    if sop_class not in PROCESSED_SOP_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED, UnsupportedFormatError(uid, (
            f"SOP Class {sop_class} ({_sop_name(sop_class)}) is not read by this node: it reads CR, DX and "
            "Secondary Capture chest radiographs"))
    if sop_class == SECONDARY_CAPTURE and str(ds.get("Modality") or "").upper() not in ("CR", "DX"):
        return SOP_CLASS_NOT_SUPPORTED, UnsupportedFormatError(uid, (
            f"a Secondary Capture with Modality {ds.get('Modality') or 'none'}: only captured CR/DX radiographs "
            "are read"))
    if _is_own_output(ds):
        return SOP_CLASS_NOT_SUPPORTED, UnsupportedFormatError(uid, (
            "this is an output of cxrkit (Manufacturer cxrkit, DERIVED): not analysed again"))
    if "PixelData" not in ds or not int(ds.get("Rows") or 0) or not int(ds.get("Columns") or 0):
        return DOES_NOT_MATCH, InputError(uid, "an image SOP Class without Pixel Data, Rows or Columns")
    return None


def _peer(event: Any) -> str:
    try:
        req = event.assoc.requestor
        return f"{req.ae_title}@{req.address}:{req.port}"
    except Exception:  # noqa: BLE001
        return "unknown peer"


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


def _is_own_output(ds: Any) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return str(ds.get("Manufacturer") or "") == "cxrkit" and (not image_type or image_type[0] == "DERIVED")

