"""Helpers for the DICOM tests: the real outside tools (dicom3tools' dciodvfy, DCMTK), free ports.

The tools are Debian packages (``apt-get install -y dcmtk dicom3tools``; .ci/run installs them
when apt is available). A test that needs one skips, saying which and how to install it, only
when the executable is not on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

DATA = Path(os.environ.get("CXRKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
INSTALL_HINT = "apt-get install -y dcmtk dicom3tools (.ci/run does this where apt is available)"


def require_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
    return exe


def dcmtk(name: str) -> str:
    """The DCMTK executable ``name`` (storescu, storescp, echoscu...). pynetdicom installs Python
    apps with the same names into the venv's bin, so PATH order cannot be trusted: the first
    candidate whose ``--version`` says dcmtk wins."""
    seen = set()
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        exe = os.path.join(d, name)
        if exe in seen or not os.access(exe, os.X_OK):
            continue
        seen.add(exe)
        try:
            r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (r.stdout + r.stderr).lower():
            return exe
    pytest.skip(f"DCMTK's {name} is not installed: {INSTALL_HINT}")


def dciodvfy(path: "str | Path") -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports for one file."""
    exe = require_tool("dciodvfy")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    return [s for s in lines if s.startswith("Error")], [s for s in lines if s.startswith("Warning")]


def assert_dciodvfy_clean(path: "str | Path") -> None:
    errors, _ = dciodvfy(path)
    assert not errors, f"dciodvfy {path}:\n" + "\n".join(errors)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} not found (set CXRKIT_SHARED_DATA)")
    return DATA


# transfer syntaxes of the shared test files (and the uncompressed ones), for storescu's profile
_TS = {
    "Uncompressed": ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
    "JPEGBaseline": ["1.2.840.10008.1.2.4.50"],
    "JPEGExtended": ["1.2.840.10008.1.2.4.51"],
    "JPEGLossless57": ["1.2.840.10008.1.2.4.57"],
    "JPEGLossless70": ["1.2.840.10008.1.2.4.70"],
    "JPEGLSLossless": ["1.2.840.10008.1.2.4.80"],
    "JPEGLSNear": ["1.2.840.10008.1.2.4.81"],
    "J2KLossless": ["1.2.840.10008.1.2.4.90"],
    "J2K": ["1.2.840.10008.1.2.4.91"],
    "RLE": ["1.2.840.10008.1.2.5"],
}
_CLASSES = ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
            "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.2"]


def storescu_config(path: "str | Path") -> list[str]:
    """Write a DCMTK storescu configuration whose profile ``CXR`` proposes each transfer syntax of
    the test files (by default storescu proposes uncompressed ones only and would have to
    transcode, which it cannot do for JPEG 2000) for CR, DX, SC, SR and CT; returns the storescu
    arguments that use it."""
    lines = ["[[TransferSyntaxes]]"]
    for name, uids in _TS.items():
        lines.append(f"[{name}]")
        lines += [f"TransferSyntax{i + 1} = {u}" for i, u in enumerate(uids)]
    lines += ["[[PresentationContexts]]", "[CXRContexts]"]
    n = 0
    for cls in _CLASSES:
        for name in _TS:
            n += 1
            lines.append(f"PresentationContext{n} = {cls}\\{name}")
    lines += ["[[Profiles]]", "[CXR]", "PresentationContexts = CXRContexts"]
    Path(path).write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "CXR"]
