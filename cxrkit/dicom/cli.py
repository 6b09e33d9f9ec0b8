"""Command-line parts of cxrkit.dicom: ``cxrkit dicom-node`` and ``cxrkit predict --dicom-out``.

Only registered in cxrkit/cli.py; the logic lives here.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["add_node_parser", "add_dicom_out_args", "DicomOutWriter"]

log = logging.getLogger(__name__)


def _kinds(text: str) -> tuple[str, ...]:
    from cxrkit.dicom.outputs import OUTPUT_KINDS

    if text.strip().lower() in ("", "none"):
        return ()
    kinds = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown output(s) {bad}; choose from {','.join(OUTPUT_KINDS)} or 'none'")
    return kinds


# -- cxrkit predict --dicom-out ---------------------------------------------------------------


def add_dicom_out_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM outputs (cxrkit.dicom; pip install cxrkit[dicom])")
    g.add_argument("--dicom-out", metavar="DIR", help="write a TID 1500 SR, a GSPS and a burned-in SC per image here; "
                   "DICOM inputs keep their Study, other inputs get a new one")
    g.add_argument("--dicom-outputs", type=_kinds, default=("sr", "gsps", "sc"), metavar="KINDS",
                   help="comma-separated: sr, gsps, sc (default: all three)")
    g.add_argument("--study-uid", help="Study Instance UID for non-DICOM inputs (default: a new one per image)")
    g.add_argument("--patient-id", default="", help="Patient ID for non-DICOM inputs")
    g.add_argument("--patient-name", default="", help="Patient's Name (DICOM PN, e.g. Doe^Jane) for non-DICOM inputs")
    g.add_argument("--accession-number", default="", help="Accession Number for non-DICOM inputs")
    g.add_argument("--study-id", default="", help="Study ID for non-DICOM inputs")


class DicomOutWriter:
    """Writes the outputs of each successful Prediction of ``cxrkit predict`` (errors are
    reported per image, never fatal for the rest)."""

    def __init__(self, a: argparse.Namespace, model: Any) -> None:
        from cxrkit.dicom.source import StudyInfo

        self.folder = Path(a.dicom_out)
        self.kinds = a.dicom_outputs
        self.model = model
        self.study = StudyInfo(patient_id=a.patient_id, patient_name=a.patient_name, accession_number=a.accession_number,
                               study_id=a.study_id, study_instance_uid=a.study_uid)
        self.n_written = 0
        self.n_failed = 0

    def write(self, pred: Any, source: Any) -> list[Path]:
        from cxrkit.dicom.outputs import make_outputs
        from cxrkit.errors import CxrkitError

        if pred.error is not None or not self.kinds:
            return []
        try:
            outs = make_outputs(pred, source, kinds=self.kinds, study=self.study, model=self.model)
            paths = outs.save(self.folder)
        except (CxrkitError, OSError, ValueError) as exc:
            self.n_failed += 1
            print(f"cxrkit predict: no DICOM outputs for {pred.source}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return []
        self.n_written += len(paths)
        return paths


# -- cxrkit dicom-node ------------------------------------------------------------------------


def add_node_parser(sub: Any, add_model_args: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("dicom-node", help="a DICOM node: C-STORE in, SR/GSPS/SC out to a destination AE",
                       description="Receive chest X-rays by DICOM C-STORE, analyse them with one BatchingDetector and "
                       "send a TID 1500 SR, a GSPS and a burned-in Secondary Capture to each --forward destination. "
                       "Answers C-ECHO. SIGINT/SIGTERM stop it after the queued work (see --drain-timeout). "
                       "Demonstration software: every output says NOT FOR DIAGNOSTIC USE.")
    add_model_args(p)
    p.add_argument("--ae-title", default="CXRKIT", help="our AE title (called AE title peers must use)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--forward", action="append", default=[], metavar="HOST:PORT:AE",
                   help="send the outputs here by C-STORE (repeat for several destinations)")
    p.add_argument("--outputs", type=_kinds, default=("sr", "gsps", "sc"), metavar="KINDS",
                   help="comma-separated: sr, gsps, sc, or none (default: all three)")
    p.add_argument("--forward-associations", type=int, default=4, metavar="N",
                   help="parallel associations per destination (default: 4; a store waits for its answer)")
    p.add_argument("--out", metavar="DIR", help="also write the outputs to this folder")
    p.add_argument("--journal", metavar="FILE", help="append one JSON line per received instance (its end and why)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="analyse lateral / non-chest images too (with warnings in the outputs) instead of refusing them")
    p.add_argument("--max-queue", type=int, default=64, help="instances received and not finished (default: 64)")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a C-STORE waits for queue room before 0xA700 (default: 30)")
    p.add_argument("--max-delay-ms", type=float, default=20.0, help="batching delay (default: 20)")
    p.add_argument("--allow-aet", action="append", default=[], metavar="AE",
                   help="accept associations only from these calling AE titles (repeatable)")
    p.add_argument("--uid-prefix", help="your organization's UID root for new UIDs, ending in '.'")
    p.add_argument("--receiver", choices=("process", "thread"), default="process",
                   help="where pynetdicom receives: 'process' (default: a process of its own that spools each data "
                   "set to a file, keeping DICOM networking off the detector's GIL; faster, see "
                   "benchmarks/RESULTS.md) or 'thread' (in the detector's process)")
    p.add_argument("--spool", metavar="DIR", help="with --receiver process: the folder for received data sets "
                   "(default: a temporary folder, removed at exit)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="on shutdown, seconds to finish queued work before reporting it unfinished (default: 120)")
    p.set_defaults(fn=cmd_dicom_node)
    return p


def cmd_dicom_node(a: argparse.Namespace) -> int:
    from cxrkit.dicom.node import DicomNode

    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    if not a.forward and not a.out and a.outputs:
        print("cxrkit dicom-node: no --forward destination and no --out folder: outputs are made and only journaled",
              file=sys.stderr)
    node = DicomNode(a.model, ae_title=a.ae_title, host=a.host, port=a.port, forward=a.forward, outputs=a.outputs,
                     out_dir=a.out, strict=a.strict, max_queue=a.max_queue, queue_timeout_s=a.queue_timeout,
                     max_batch=a.batch_size, max_delay_ms=a.max_delay_ms, journal_path=a.journal,
                     uid_prefix=a.uid_prefix, allowed_calling_aets=a.allow_aet,
                     forward_associations=a.forward_associations, receiver=a.receiver, spool_dir=a.spool,
                     device=a.device, backend=a.backend,
                     precision=a.precision)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    lost = False
    try:
        node.start()
        print(f"cxrkit dicom-node: {a.ae_title} listening on {a.host}:{node.port}; outputs "
              f"{','.join(a.outputs) or 'none'} -> {', '.join(a.forward) or '(no destination)'}; not for clinical use",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not node.is_listening():  # the receiver process died: nothing arrives any more
                lost = True
                break
        print("cxrkit dicom-node: " + ("the receiver process ended unexpectedly; " if lost else "") +
              "stopping; finishing queued work", file=sys.stderr, flush=True)
    finally:
        report = node.stop(drain=True, timeout=a.drain_timeout)
        for s, h in old.items():
            signal.signal(s, h)
    print(json.dumps({"journal": node.journal.counts(), "unfinished": report.unfinished,
                      "forward_pending": report.forward_pending}))
    return 0 if report.clean and not lost else 3
