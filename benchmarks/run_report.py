"""Small JSON reports of long runs (fuzzing, concurrency soak, memory stream, benchmarks), so that
every figure README.md and RESULTS.md quote comes from a stored file with its date and machine.

``write_report(name, payload)`` writes ``benchmarks/reports/<name>.json`` (or ``$CXRKIT_REPORT_DIR``):
the payload plus when (UTC), where (CPU model, cores, memory, load), what code (git commit, whether
the tree had uncommitted changes, package versions) and the command line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "benchmarks" / "reports"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for benchmark headers and reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cxrkit", "numpy", "onnxruntime", "torch", "pillow", "pydicom", "imagecodecs", "hypothesis"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": _mem_gib(),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def write_report(name: str, payload: dict[str, Any], started_utc: str | None = None) -> Path:
    status = _git("status", "--porcelain", "--untracked-files=no")
    doc = {
        "name": name,
        "started_utc": started_utc,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": {"git_commit": _git("rev-parse", "HEAD"), "uncommitted_changes": bool(status) if status is not None else None,
                 # a `git archive` snapshot measured outside the shared tree names its commit in COMMIT
                 "snapshot_of_commit": (ROOT / "COMMIT").read_text().strip() if (ROOT / "COMMIT").is_file() else None,
                 "versions": _versions()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **payload,
    }
    out_dir = Path(os.environ.get("CXRKIT_REPORT_DIR") or DEFAULT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
