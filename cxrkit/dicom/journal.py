"""The node's journal: one entry per received C-STORE, from receipt to its end.

Statuses: ``received`` -> ``queued`` -> ``processing`` -> one end: ``done`` (outputs made and
stored at every destination), ``failed`` (read, analysis, outputs or forwarding failed: the typed
error says which), ``refused`` (the header quality gate, ``strict``), ``rejected`` (answered with
a failure DIMSE status at once), or ``not_processed`` (the node stopped first). Each end is
logged and, with a path, appended to a JSON-lines file; ``entries`` and ``counts`` serve tests
and monitoring.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Journal", "JournalEntry", "FINAL_STATUSES"]

log = logging.getLogger("cxrkit.dicom.node")

FINAL_STATUSES = frozenset({"done", "failed", "refused", "rejected", "not_processed"})


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class JournalEntry:
    sop_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    received_utc: str
    received_s: float  # time.monotonic()
    status: str = "received"
    dimse_status: int | None = None
    error_type: str | None = None
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    forwarded: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    finished_utc: str | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "received_s"}
        if self.dimse_status is not None:
            d["dimse_status"] = f"0x{self.dimse_status:04X}"
        return d


class Journal:
    def __init__(self, path: "str | os.PathLike[str] | None" = None) -> None:
        self._lock = threading.Lock()
        self._entries: list[JournalEntry] = []
        self._open: set[int] = set()
        self._file = open(path, "a", encoding="utf-8") if path else None
        self._first_done: float | None = None
        self._last_done: float | None = None
        self._last_received: float | None = None

    def receive(self, uid: str, sop_class: str, calling_ae: str) -> JournalEntry:
        now = time.monotonic()
        e = JournalEntry(uid, sop_class, calling_ae, _utc(), now)
        with self._lock:
            self._entries.append(e)
            self._open.add(id(e))
            self._last_received = now
        return e

    def update(self, entry: JournalEntry, *, status: str) -> None:
        with self._lock:
            if entry.status not in FINAL_STATUSES:
                entry.status = status

    def finish(self, entry: JournalEntry, status: str, *, error: BaseException | None = None,
               dimse_status: int | None = None) -> None:
        assert status in FINAL_STATUSES, status
        now = time.monotonic()
        with self._lock:
            if entry.status in FINAL_STATUSES:
                return
            entry.status = status
            entry.dimse_status = dimse_status
            if error is not None:
                entry.error_type, entry.error = type(error).__name__, str(error)
            entry.finished_utc = _utc()
            entry.latency_ms = round((now - entry.received_s) * 1e3, 1)
            self._open.discard(id(entry))
            if status == "done":
                self._first_done = self._first_done if self._first_done is not None else entry.received_s
                self._last_done = now
            line = json.dumps(entry.to_dict()) if self._file is not None else None
            if line is not None:
                self._file.write(line + "\n")
                self._file.flush()
        if status == "done":
            log.info("%s from %s: done, %d output(s) in %.0f ms", entry.sop_instance_uid, entry.calling_ae,
                     len(entry.outputs), entry.latency_ms)
        else:
            status_txt = f" (DIMSE status 0x{dimse_status:04X})" if dimse_status is not None else ""
            log.warning("%s from %s: %s%s: %s: %s", entry.sop_instance_uid, entry.calling_ae, status, status_txt,
                        entry.error_type, entry.error)

    def close_open(self, error: BaseException) -> list[str]:
        """Journal every unfinished entry as not processed; their UIDs."""
        with self._lock:
            open_entries = [e for e in self._entries if id(e) in self._open]
        for e in open_entries:
            self.finish(e, "not_processed", error=error)
        return [e.sop_instance_uid for e in open_entries]

    def entries(self) -> list[JournalEntry]:
        with self._lock:
            return list(self._entries)

    def by_uid(self, uid: str) -> list[JournalEntry]:
        return [e for e in self.entries() if e.sop_instance_uid == uid]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(e.status for e in self._entries))

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def finished_count(self) -> int:
        with self._lock:
            return len(self._entries) - len(self._open)

    def last_received(self) -> float | None:
        return self._last_received

    def time_span(self) -> tuple[float | None, float | None]:
        """(receipt of the first instance that got done, end of the last one done), monotonic s."""
        return self._first_done, self._last_done

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
